"""Uplink failover in real network namespaces (see tests/e2e/netns.py for the topology).

The supervisor runs inside the "charger" namespace (``python -m agent.uplink``, the route
back-end, TLS probes to a real TLS server in the "csms" namespace); faults are real: the
router's side of the veth goes down (carrier loss) or the router blackholes the CSMS
(silent loss). Each test checks what the charger's kernel does -- ``ip route get`` to the
CSMS -- and what ``evcp status --json`` would show. The OCPP session is not wired in here:
the runner's recording stand-in counts the reconnects the supervisor asks for.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from drivers.sim.modem import SimModem
from tests.e2e.netns import (
    CSMS_ADDR,
    Topology,
    netns_unavailable,
    socket_in_netns,
    start_tls_server,
)

pytestmark = pytest.mark.skipif((reason := netns_unavailable()) is not None, reason=str(reason))

Status = dict[str, Any]

CONFIG = """
[csms]
url = "wss://{addr}:8443/ocpp"
charge_point_id = "CP-UPLINK"
password = "0123456789abcdef-test"
ca_file = "{ca}"

[agent]
state_dir = "state"

[time]
ntp_servers = []

[uplink]
backend = "route"
hold_s = {hold_s}
probe_interval_s = 1.0
probe_timeout_s = 0.9
failures_to_down = 3
successes_to_up = 2
gsm_probe_interval_s = 30
probe_tls = true

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
{gsm_extra}
"""


class Charger:
    """The supervisor running in the charger namespace."""

    def __init__(self, topo: Topology, proc: subprocess.Popen[bytes], status: Path, log: Path):
        self.topo = topo
        self.proc = proc
        self.status_file = status
        self.log_file = log

    def status(self) -> Status:
        try:
            data: Status = json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def wait(self, what: str, check: Callable[[Status], bool], timeout: float = 60) -> Status:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status and check(status):
                return status
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.status()}\n{self.log()}")

    def wait_active(self, name: str, dev: str, timeout: float = 60) -> Status:
        status = self.wait(f"{name} active", lambda s: s.get("active") == name, timeout)
        deadline = time.monotonic() + 10
        while self.topo.route_dev() != dev:  # the kernel follows the back-end at once
            assert time.monotonic() < deadline, (self.topo.default_routes(), self.log())
            time.sleep(0.05)
        return status

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def switch_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "uplink: switched" in line]


def link(status: Status, name: str) -> Status:
    found: Status = next(lk for lk in status["links"] if lk["name"] == name)
    return found


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as topology:
        yield topology


@pytest.fixture
def tls_server(topo: Topology, tmp_path: Path) -> Iterator[Path]:
    ca = trustme.CA()
    cert = ca.issue_cert(CSMS_ADDR)
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    proc = start_tls_server(topo, cert_file, key_file)
    yield ca_file
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def charger(topo: Topology, tls_server: Path, tmp_path: Path) -> Iterator[Callable[..., Charger]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(hold_s: float = 3, gsm_extra: str = "", prefix: list[str] | None = None) -> Charger:
        config = tmp_path / "evcp.toml"
        config.write_text(
            CONFIG.format(addr=CSMS_ADDR, ca=tls_server, hold_s=hold_s, gsm_extra=gsm_extra)
        )
        status, log = tmp_path / "status.json", tmp_path / "uplink.log"
        argv = [*(prefix or []), sys.executable, "-m", "agent.uplink", "--config", str(config),
                "--status-file", str(status), "--modem-poll-s", "0.3"]  # fmt: skip
        with log.open("wb") as err:
            proc = topo.popen(topo.charger, argv, stdin=subprocess.PIPE, stderr=err)
        started.append(proc)
        return Charger(topo, proc, status, log)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_carrier_loss_moves_the_default_route_to_gsm(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger()
    status = ch.wait_active("wifi", "wifi0")
    assert status["last_switch"]["reason"] == "start"
    assert status["reconnects"] == []
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])

    topo.carrier("wifi", False)
    status = ch.wait_active("gsm", "gsm0")
    assert status["last_switch"]["from"] == "wifi"
    assert "wifi0 has no carrier" in status["last_switch"]["reason"]
    assert not link(status, "wifi")["carrier"]
    assert not link(status, "wifi")["healthy"]
    assert len(status["reconnects"]) == 1
    assert status["reconnects"][0].startswith("uplink switched to gsm: wifi down")
    assert len(ch.switch_lines()) == 2  # start, and this one: one line per switch
    # the OS's own routes are untouched: only evcp's copy (metric 10) moved
    metrics = sorted((r["dev"], r.get("metric", 0)) for r in topo.default_routes())
    assert metrics == [("gsm0", 10), ("gsm0", 700), ("wifi0", 600)]


def test_silent_loss_behind_a_router_with_carrier_moves_to_gsm(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger()
    ch.wait_active("wifi", "wifi0")
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    topo.blackhole("wifi", True)
    status = ch.wait_active("gsm", "gsm0")
    assert link(status, "wifi")["carrier"]  # the link looked fine
    # the SYN is dropped: the TCP connect itself times out
    assert "3 probes failed: connect timed out after 0.9 s" in status["last_switch"]["reason"]


def test_csms_reachable_only_over_gsm_from_the_start(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    topo.blackhole("wifi", True)
    ch = charger()
    status = ch.wait_active("gsm", "gsm0")
    assert status["last_switch"]["from"] is None
    assert not link(status, "wifi")["healthy"]
    assert status["reconnects"] == []  # the first choice is not a reconnect


def test_wifi_returns_and_the_agent_moves_back_after_the_hold(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger(hold_s=3)
    ch.wait_active("wifi", "wifi0")
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    topo.carrier("wifi", False)
    ch.wait_active("gsm", "gsm0")
    topo.carrier("wifi", True)
    # WiFi healthy again while gsm still carries the traffic: the hold is running
    standby = ch.wait(
        "wifi healthy on standby", lambda s: link(s, "wifi")["healthy"] and s["active"] == "gsm"
    )
    hold = link(standby, "wifi")["hold_s"]  # 3 s, or 6 s if the drop counted as a flap
    assert hold == 3 * 2 ** link(standby, "wifi")["flaps"]
    status = ch.wait_active("wifi", "wifi0")
    assert status["last_switch"]["reason"].startswith("wifi healthy for ")
    assert status["last_switch"]["reason"].endswith(f"(hold {hold:.0f} s)")
    assert len(status["reconnects"]) == 2


def test_a_flapping_wifi_does_not_make_the_agent_flap(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger(hold_s=2)
    ch.wait_active("wifi", "wifi0")
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    topo.carrier("wifi", False)
    ch.wait_active("gsm", "gsm0")
    for _ in range(4):  # WiFi comes back just long enough to look healthy, then drops
        topo.carrier("wifi", True)
        ch.wait("wifi back", lambda s: link(s, "wifi")["healthy"])
        topo.carrier("wifi", False)
        ch.wait("wifi gone", lambda s: not link(s, "wifi")["carrier"])
        assert ch.status()["active"] == "gsm"
    status = ch.status()
    assert len(status["reconnects"]) == 1
    assert link(status, "wifi")["flaps"] >= 4
    assert link(status, "wifi")["hold_s"] == 2 * 16  # 2 s doubled per flap, capped at 16x
    # it settles: the agent moves back, but only after the longer hold
    topo.carrier("wifi", True)
    status = ch.wait_active("wifi", "wifi0", timeout=90)
    assert "(hold 32 s)" in status["last_switch"]["reason"], status["last_switch"]
    assert len(status["reconnects"]) == 2


def test_both_links_down_no_switch_then_back_over_the_first_to_return(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger()
    ch.wait_active("wifi", "wifi0")
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    topo.carrier("gsm", False)
    topo.carrier("wifi", False)
    status = ch.wait(
        "both down", lambda s: not link(s, "wifi")["healthy"] and not link(s, "gsm")["healthy"]
    )
    assert status["active"] == "wifi"  # nowhere to go: no switch
    assert status["reconnects"] == []
    topo.carrier("gsm", True)
    status = ch.wait_active("gsm", "gsm0")
    assert len(status["reconnects"]) == 1


def test_forced_switch_and_no_move_back_while_a_call_awaits_its_answer(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    ch = charger(hold_s=1)
    ch.wait_active("wifi", "wifi0")
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    ch.send("switch lte")
    ch.send("switch gsm")
    status = ch.wait_active("gsm", "gsm0")
    assert status["forced"] == "gsm"
    assert (status["last_switch"]["reason"], status["last_switch"]["forced"]) == (
        "forced by the operator",
        True,
    )
    assert "uplink switch: no link named 'lte'" in ch.log()
    ch.send("call on")
    ch.send("auto")
    ch.wait("waiting for the CALL", lambda s: s["waiting_for_call"] and s["active"] == "gsm")
    assert topo.route_dev() == "gsm0"
    ch.send("call off")
    ch.wait_active("wifi", "wifi0")


def test_without_cap_net_admin_one_clear_error_and_it_keeps_running(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
    ch = charger(prefix=drop)
    status = ch.wait("a decision", lambda s: s.get("active") == "wifi" and s["backend_error"])
    assert "needs CAP_NET_ADMIN" in status["backend_error"]
    ch.wait("gsm probed", lambda s: link(s, "gsm")["healthy"])
    topo.carrier("wifi", False)
    status = ch.wait("switched", lambda s: s["active"] == "gsm")
    assert len(status["reconnects"]) == 1  # the session is still moved
    errors = [line for line in ch.log().splitlines() if "CAP_NET_ADMIN" in line]
    assert len(errors) == 1, ch.log()
    assert "Traceback" not in ch.log()
    assert all(r.get("metric") != 10 for r in topo.default_routes())  # nothing was changed


async def test_modem_signal_and_identity_in_status(
    topo: Topology, charger: Callable[..., Charger]
) -> None:
    modem = SimModem()
    path = await modem.start()
    try:
        ch = charger(gsm_extra=f'at_port = "{path}"')
        # the simulated modem answers from this event loop: wait in a thread
        status = await asyncio.to_thread(
            ch.wait, "modem read", lambda s: (s.get("modem") or {}).get("iccid") is not None
        )
        expected = {
            "link": "gsm",
            "iccid": "89441000301234567890",
            "imsi": "234150123456789",
            "rssi_dbm": -73,
            "operator": "SimTel",
            "registered": True,
        }
        assert {key: status["modem"][key] for key in expected} == expected
        modem.lose_registration()
        status = await asyncio.to_thread(
            ch.wait, "registration lost", lambda s: s["modem"]["registered"] is False
        )
        assert status["modem"]["iccid"] == "89441000301234567890"  # identity kept
        assert "modem lost its registration" in ch.log()
    finally:
        await modem.stop()


def test_a_missing_interface_is_one_warning_and_the_link_counts_as_down(
    topo: Topology, charger: Callable[..., Charger], tmp_path: Path
) -> None:
    ch = charger(
        gsm_extra='[[uplink.links]]\nname = "eth"\ninterface = "eth7"\nkind = "ethernet"\npriority = 3'
    )
    status = ch.wait_active("wifi", "wifi0")
    status = ch.wait("eth judged", lambda s: link(s, "eth")["state"] == "down")
    assert link(status, "eth")["reason"] == "interface eth7 does not exist"
    topo.carrier("wifi", False)
    ch.wait_active("gsm", "gsm0")
    warnings = [line for line in ch.log().splitlines() if "eth7 does not exist" in line]
    assert len(warnings) == 1, ch.log()


async def test_an_in_process_server_can_listen_in_the_csms_namespace(
    topo: Topology, tmp_path: Path
) -> None:
    """The helper for the OCPP-over-a-switch test: a server of this test process (here a
    TLS echo, there the test CSMS) answers a client in the charger namespace over the
    link the charger's kernel picks."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(CSMS_ADDR).configure_cert(ctx)
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    peers: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(
        handle, sock=socket_in_netns(topo.csms, CSMS_ADDR, 9443), ssl=ctx
    )
    client = (
        "import socket, ssl, sys\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        f"with socket.create_connection(('{CSMS_ADDR}', 9443), timeout=10) as s:\n"
        f"    ctx.wrap_socket(s, server_hostname='{CSMS_ADDR}').close()\n"
    )
    try:
        for fault, source in ((None, "10.1.0.2"), ("wifi", "10.2.0.2")):
            if fault:  # without a supervisor: make gsm win by hand, as the back-end would
                topo.ip(topo.charger, "route", "add", "default", "via", "10.2.0.1", "metric", "10")
            proc = await asyncio.create_subprocess_exec(
                *topo.exec_argv(
                    topo.charger, [sys.executable, "-c", client, str(tmp_path / "ca.pem")]
                )
            )
            assert await proc.wait() == 0
            assert peers[-1] == source
    finally:
        server.close()
        await server.wait_closed()
