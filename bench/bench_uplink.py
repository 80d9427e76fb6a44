"""Uplink failover figures (prints, never asserts), in real network namespaces, with the
default ``[uplink]`` settings (probe every 2 s, 1.5 s timeout, 3 failures to down, 3
successes to up, hold 60 s, gsm probed every 300 s, TCP probes):

- fault to switch (the chosen link's default route wins in the charger's kernel), for a
  carrier loss and for a silent loss (the router blackholes the CSMS), over several trials
  (target <= 10 s for both; mwan3's defaults take about 15 s just to detect). The OCPP
  reconnect that follows adds one TLS handshake over the new link (not in this figure: the
  session is not wired in here);
- time from the WiFi coming back to moving back to it (hold_s + the probes to confirm);
- bytes per probe on gsm0, measured from the interface's counters around real probes (TCP
  connect, and TLS handshake), and what that makes per day on the standby GSM link;
- the supervisor's resident memory and CPU share while idle;
- with ``--ocpp``: the whole agent (``python -m agent run``, simulated hardware, a
  transaction running) against the test CSMS over WSS in the csms namespace: time from the
  fault to the CSMS accepting the new OCPP connection from the charger's gsm0 address, for
  both faults, and the resident memory with ``[uplink]`` of the agent and, separately, of
  its uplink process (``python -m agent.uplink --child``, where pyroute2 lives).

Needs root (``ip netns``). Usage: python bench/bench_uplink.py [--trials 3] [--skip-move-back]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import UPLINK_KEYS  # noqa: E402
from tests.e2e.netns import (  # noqa: E402
    CSMS_ADDR,
    LINKS,
    Topology,
    netns_unavailable,
    socket_in_netns,
    start_tls_server,
)

CONFIG = """
[csms]
url = "wss://{addr}:8443/ocpp"
charge_point_id = "CP-BENCH"
password = "0123456789abcdef-test"
ca_file = "{ca}"
[agent]
state_dir = "state"
[time]
ntp_servers = []
[uplink]
backend = "route"
[[uplink.links]]
name = "wifi"
interface = "wifi0"
kind = "wifi"
priority = 1
[[uplink.links]]
name = "gsm"
interface = "gsm0"
kind = "gsm"
priority = 2
"""

PROBE = """
import asyncio, ssl, sys
from drivers.uplink.probe import Prober
tls = None
if sys.argv[2] == "tls":
    tls = ssl.create_default_context(cafile=sys.argv[3])
async def main():
    for _ in range(int(sys.argv[1])):
        result = await Prober("{addr}", 8443, tls=tls).probe("gsm0")
        assert result.ok, result
asyncio.run(main())
"""


class Runner:
    def __init__(self, topo: Topology, config: Path, work: Path) -> None:
        self.status_file = work / "status.json"
        self.status_file.unlink(missing_ok=True)
        self.topo = topo
        self.proc = topo.popen(
            topo.charger,
            [
                sys.executable,
                "-m",
                "agent.uplink",
                "--config",
                str(config),
                "--status-file",
                str(self.status_file),
            ],
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def status(self) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def healthy(self, name: str) -> bool:
        links = self.status().get("links") or []
        return any(lk["name"] == name and lk["healthy"] for lk in links)  # type: ignore[attr-defined]

    def wait_route(self, dev: str, timeout: float = 120) -> float:
        """Poll the charger's kernel until the CSMS is routed via ``dev``; the time then."""
        deadline = time.monotonic() + timeout
        while self.topo.route_dev() != dev:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no switch to {dev} within {timeout} s: {self.status()}")
            time.sleep(0.02)
        return time.monotonic()

    def wait(self, check: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {self.status()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fault_to_switch(topo: Topology, config: Path, work: Path, fault: str) -> float:
    runner = Runner(topo, config, work)
    try:
        runner.wait(lambda: runner.status().get("active") == "wifi" and runner.healthy("gsm"))
        runner.wait_route("wifi0")
        time.sleep(2.5)  # the fault lands anywhere in the probe cycle
        start = time.monotonic()
        if fault == "carrier":
            topo.carrier("wifi", False)
        else:
            topo.blackhole("wifi", True)
        return runner.wait_route("gsm0") - start
    finally:
        runner.stop()
        if fault == "carrier":
            topo.carrier("wifi", True)
        else:
            topo.blackhole("wifi", False)
        topo.ip(topo.charger, "route", "flush", "proto", "211", check=False)


def move_back(topo: Topology, config: Path, work: Path) -> float:
    runner = Runner(topo, config, work)
    try:
        runner.wait(lambda: runner.status().get("active") == "wifi" and runner.healthy("gsm"))
        time.sleep(65)  # up for longer than the hold: the drop below is not a flap
        topo.carrier("wifi", False)
        runner.wait_route("gsm0")
        start = time.monotonic()
        topo.carrier("wifi", True)
        return runner.wait_route("wifi0", timeout=300) - start
    finally:
        runner.stop()


def probe_bytes(topo: Topology, ca: Path, kind: str, count: int = 10) -> float:
    before = topo.byte_counters(topo.charger, "gsm0")
    subprocess.run(
        topo.exec_argv(
            topo.charger,
            [sys.executable, "-c", PROBE.format(addr=CSMS_ADDR), str(count), kind, str(ca)],
        ),
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    time.sleep(0.5)  # the last FIN/ACKs
    return (topo.byte_counters(topo.charger, "gsm0") - before) / count


def idle_cost(topo: Topology, config: Path, work: Path, seconds: float) -> tuple[float, float]:
    runner = Runner(topo, config, work)
    try:
        runner.wait(lambda: runner.status().get("active") == "wifi")
        pid = runner.proc.pid  # `ip netns exec` execs the interpreter: same PID
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        share = (cpu() - c0) / (time.monotonic() - t0) * 100
        rss = next(
            int(line.split()[1]) / 1024
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return rss, share
    finally:
        runner.stop()


UPLINK_DEFAULTS = """
[uplink]
backend = "route"
[[uplink.links]]
name = "wifi"
interface = "wifi0"
kind = "wifi"
priority = 1
[[uplink.links]]
name = "gsm"
interface = "gsm0"
kind = "gsm"
priority = 2
"""


def rss_mib(pid: int) -> float:
    return next(
        int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (libpython, libcrypto...) divided among users."""
    return next(
        int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        if line.startswith("Pss:")
    )


async def ocpp_reconnect(
    topo: Topology, work: Path, fault: str
) -> tuple[float, float, float, float, float, float]:
    """(fault -> switch, fault -> OCPP connection accepted over gsm0, RSS MiB of the agent
    and of its uplink process, PSS MiB of both)."""
    from ocpp.v16 import call

    from agent.control import request
    from agent.ocpp.csms import Csms
    from tests.conftest import CP_ID, PASSWORD, server_context, write_config

    ca = trustme.CA()
    ca.cert_pem.write_to_path(work / "ocpp-ca.pem")
    csms = Csms(passwords={CP_ID: PASSWORD})
    await csms.start(
        server_context(ca, CSMS_ADDR), sock=socket_in_netns(topo.csms, CSMS_ADDR, 9443)
    )
    run_dir = work / f"ocpp-{fault}"
    run_dir.mkdir()
    config = write_config(
        run_dir, url=f"wss://{CSMS_ADDR}:9443/ocpp", ca_file=work / "ocpp-ca.pem",
        time_scale=60.0, extra=UPLINK_DEFAULTS,
    )  # fmt: skip
    proc = topo.popen(topo.charger, [sys.executable, "-m", "agent", "run", "--config", str(config)],
                      stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    sock = run_dir / "control.sock"

    def status() -> dict[str, object]:
        try:
            return request(sock, {"cmd": "status"}, timeout_s=5.0)
        except Exception:
            return {}

    async def until(check: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {status()}")
            await asyncio.sleep(0.01)

    def healthy_gsm() -> bool:
        uplink = status().get("uplink") or {}
        links = uplink.get("links", [])  # type: ignore[attr-defined]
        return any(lk["name"] == "gsm" and lk["healthy"] for lk in links)

    try:
        await csms.wait_message("BootNotification", timeout_s=60)
        await until(healthy_gsm)
        await asyncio.to_thread(request, sock, {"cmd": "sim", "request": {"cmd": "plug"}})
        await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="TAG-1", connector_id=1))
        await csms.wait_message("StartTransaction", timeout_s=30)
        await asyncio.sleep(2.5)  # the fault lands anywhere in the probe cycle
        start = time.monotonic()
        if fault == "carrier":
            topo.carrier("wifi", False)
        else:
            topo.blackhole("wifi", True)
        switched: list[float] = []
        gsm = LINKS["gsm"][1]

        def reconnected() -> bool:
            if not switched and topo.route_dev() == "gsm0":
                switched.append(time.monotonic())
            return gsm in csms.peers

        await until(reconnected)
        connected = time.monotonic()
        if not switched:
            switched.append(connected)
        uplink: dict[str, object] = status().get("uplink") or {}  # type: ignore[assignment]
        child = int(uplink["process"]["pid"])  # type: ignore[index]
        return (
            switched[0] - start,
            connected - start,
            rss_mib(proc.pid),
            rss_mib(child),
            pss_mib(proc.pid),
            pss_mib(child),
        )
    finally:
        proc.terminate()
        proc.wait(30)
        await csms.stop()
        if fault == "carrier":
            topo.carrier("wifi", True)
        else:
            topo.blackhole("wifi", False)
        topo.ip(topo.charger, "route", "flush", "proto", "211", check=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--skip-move-back", action="store_true")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--ocpp", action="store_true", help="also the whole agent's reconnect")
    parser.add_argument("--only-ocpp", action="store_true", help="only the whole agent's")
    args = parser.parse_args()
    if (why := netns_unavailable()) is not None:
        print(f"skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory() as tmp, Topology() as topo:
        work = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert(CSMS_ADDR)
        cert.cert_chain_pems[0].write_to_path(work / "cert.pem")
        cert.private_key_pem.write_to_path(work / "key.pem")
        ca.cert_pem.write_to_path(work / "ca.pem")
        server = start_tls_server(topo, work / "cert.pem", work / "key.pem")
        config = work / "evcp.toml"
        config.write_text(CONFIG.format(addr=CSMS_ADDR, ca=work / "ca.pem"))
        try:
            if args.ocpp or args.only_ocpp:
                for fault in ("carrier", "silent"):
                    runs = [asyncio.run(ocpp_reconnect(topo, work / f"{fault}{i}", fault))
                            for i in range(args.trials)
                            if not (work / f"{fault}{i}").mkdir()]  # fmt: skip
                    sw, oc, rss, child_rss, pss, child_pss = zip(*runs, strict=True)
                    print(
                        f"{fault:8} loss -> OCPP connected over gsm0: median"
                        f" {statistics.median(oc):.2f} s, max {max(oc):.2f} s (switch: median"
                        f" {statistics.median(sw):.2f} s) over {len(oc)} trials (target <= 10 s);"
                        f" RSS: agent {max(rss):.1f} MiB (target 36 MiB), its uplink process"
                        f" {max(child_rss):.1f} MiB (PSS: {max(pss):.1f} and"
                        f" {max(child_pss):.1f} MiB)"
                    )
                if args.only_ocpp:
                    return 0
            for fault in ("carrier", "silent"):
                times = [fault_to_switch(topo, config, work, fault) for _ in range(args.trials)]
                print(
                    f"{fault:8} loss -> switch: median {statistics.median(times):.2f} s,"
                    f" max {max(times):.2f} s over {len(times)} trials (target <= 10 s)"
                )
            if not args.skip_move_back:
                print(f"wifi back -> moved back: {move_back(topo, config, work):.1f} s (hold 60 s)")
            interval = float(UPLINK_KEYS["gsm_probe_interval_s"].default)
            per_day = 86400 / interval
            for kind in ("tcp", "tls"):
                per_probe = probe_bytes(topo, work / "ca.pem", kind)
                print(
                    f"gsm standby probe ({kind}): {per_probe:.0f} bytes per probe (IP, both"
                    f" ways), every {interval:.0f} s: {per_probe * per_day / 1e6:.3f} MB/day"
                    " (target <= 1 MB/day)"
                )
            rss, share = idle_cost(topo, config, work, args.idle_seconds)
            print(
                f"supervisor alone (python -m agent.uplink): RSS {rss:.1f} MiB, CPU {share:.2f} %"
            )
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
