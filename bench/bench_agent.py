"""Agent figures (prints, never asserts): start-up to BootNotification, memory, CPU.

Runs the device simulators (`python -m drivers.sim`: an OpenEVSE controller on a pty, an
SDM630 meter over Modbus TCP) and the real agent (`python -m agent run`) configured as on a
charger -- ``driver = "devices"``, its drivers talking to those devices -- against a local
WSS CSMS, then charges with ev.energy's settings (60 s sampling of
Energy.Active.Import.Register and Power.Active.Import) and measures the agent process only:

- process start to BootNotification received by the CSMS (target <= 1.0 s);
- resident memory while charging (target <= 36 MiB);
- CPU time per hour of charging, as a share of one core (target <= 0.2 %).

The agent runs as systemd runs it: with the ``Environment=`` settings of the shipped unit
(packaging/evcp.service), and NOTIFY_SOCKET pointing at a datagram socket of the bench
(so the sd_notify path, with systemd-python when it is installed, is part of the figure and
READY=1 is timed too). ``--python`` runs the agent with another interpreter, e.g. the
installed package's ``/opt/venvs/evcp/bin/python`` (Debian's python3.11, runtime
dependencies only), which is what a charger runs; the default is this interpreter.

``--uplink`` adds an ``[uplink]`` section (two links whose interfaces do not exist here, so
nothing on this machine's routes moves): the agent then runs its uplink process
(``python -m agent.uplink --child``, where pyroute2 lives), whose memory is printed apart.

Usage: python bench/bench_agent.py [--seconds 120] [--python PATH] [--uplink]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import shlex
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trustme
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from drivers.sim import process as sim_process

CP = "BENCH-1"
PASSWORD = "bench-password-0123456789"
UNIT = Path(__file__).resolve().parents[1] / "packaging" / "evcp.service"


def scratch(prefix: str, dir: Path | str | None = None) -> Path:
    """A temporary directory removed when the bench exits, after a failure too (atexit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def unit_environment() -> dict[str, str]:
    """The ``Environment=`` settings of the shipped systemd unit."""
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.partition("=")[2]):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_pss_mib(pid: int) -> float:
    """Proportional set size: shared library pages divided among the processes using them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


UPLINK = """
[uplink]
[[uplink.links]]
name = "wifi"
interface = "evcpbench0"
kind = "wifi"
priority = 1
[[uplink.links]]
name = "gsm"
interface = "evcpbench1"
kind = "gsm"
priority = 2
"""


async def main(seconds: float, python: str, uplink: bool = False) -> None:
    work = scratch("evcp-bench-")
    # MeterValues are staged in RAM by default: /run/evcp on a charger, /dev/shm here.
    shm = Path("/dev/shm")
    run = scratch("evcp-bench-run-", shm if shm.is_dir() else work)
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    csms = Csms(passwords={CP: PASSWORD})
    await csms.start(ctx)
    sim, devices = await sim_process.spawn(work / "sim.sock")
    config = work / "evcp.toml"
    config.write_text(f"""
[csms]
url = "wss://localhost:{csms.port}/ocpp"
charge_point_id = "{CP}"
password = "{PASSWORD}"
ca_file = "{work / "ca.pem"}"
[agent]
state_dir = "{work / "state"}"
control_socket = "{work / "control.sock"}"
stage_dir = "{run}"
log_level = "warning"
[time]
ntp_servers = []
[hardware]
driver = "devices"
meter_poll_s = 60
[meter]
model = "sdm630"
transport = "tcp"
host = "127.0.0.1"
port = "{devices["meter"]["port"]}"
[evse]
port = "{devices["evse_ports"][0]}"
[ocpp]
MeterValueSampleInterval = 60
MeterValuesSampledData = "Energy.Active.Import.Register,Power.Active.Import"
{UPLINK if uplink else ""}""")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / "notify.sock"))
    notify.setblocking(False)
    ready_at: list[float] = []

    def on_notify() -> None:
        with contextlib.suppress(BlockingIOError):
            if b"READY=1" in notify.recv(4096) and not ready_at:
                ready_at.append(time.monotonic())

    asyncio.get_running_loop().add_reader(notify.fileno(), on_notify)
    env = {**os.environ, **unit_environment(), "NOTIFY_SOCKET": str(work / "notify.sock")}
    if python == os.path.abspath(sys.executable):
        # this checkout's agent (the agent runs in the scratch directory: a venv with an
        # editable install elsewhere would otherwise run that one)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    else:
        # the agent installed in that interpreter's venv, not a source tree named in this
        # shell's PYTHONPATH (byte code compiled by another interpreter, with docstrings)
        env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "agent", "run", "--config", str(config), env=env, cwd=work
    )
    print("agent started", file=sys.stderr, flush=True)
    await csms.wait_message("BootNotification", timeout_s=30)
    boot_s = time.monotonic() - t0
    await csms.wait_message("StatusNotification", timeout_s=10)
    await sim_process.command(work / "sim.sock", {"cmd": "plug", "connector": 1})
    await csms.call(CP, call.RemoteStartTransaction(id_tag="BENCH", connector_id=1))
    await csms.wait_message("StartTransaction", timeout_s=10)
    print("charging; measuring", file=sys.stderr, flush=True)
    await asyncio.sleep(5)  # settle
    cpu0, w0 = proc_cpu_s(proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, w1 = proc_cpu_s(proc.pid), time.monotonic()
    rss, pss = proc_rss_mib(proc.pid), proc_pss_mib(proc.pid)
    threads = len(os.listdir(f"/proc/{proc.pid}/task"))
    child: int | None = None
    if uplink:
        from agent.control import request

        status = request(work / "control.sock", {"cmd": "status"}, timeout_s=5.0)
        child = status["uplink"]["process"]["pid"]
        child_rss, child_pss = proc_rss_mib(child), proc_pss_mib(child)
    meter_values = len(csms.messages("MeterValues"))
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    await sim_process.stop(sim)
    await csms.stop()
    shutil.rmtree(run, ignore_errors=True)
    share = (cpu1 - cpu0) / (w1 - w0) * 100
    print(f"interpreter: {python}")
    print(f"environment from {UNIT.name}: {unit_environment()}")
    print(f"start to BootNotification on the wire: {boot_s:.2f} s (target <= 1.0 s)")
    if ready_at:
        print(f"start to READY=1 (sd_notify):          {ready_at[0] - t0:.2f} s")
    print(f"resident memory while charging:        {rss:.1f} MiB (target <= 36 MiB)")
    print(f"  threads:                             {threads}")
    print(f"  proportional set size (PSS):         {pss:.1f} MiB")
    if child is not None:
        print(
            f"its uplink process ([uplink]):         {child_rss:.1f} MiB (PSS {child_pss:.1f} MiB)"
        )
    print(f"CPU while charging at 60 s sampling:   {share:.3f} % of one core "
          f"= {(cpu1 - cpu0) / (w1 - w0) * 3600:.1f} s per hour (target <= 0.2 %)")  # fmt: skip
    print(f"(measured over {w1 - w0:.0f} s; {meter_values} MeterValues delivered)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the agent")
    parser.add_argument("--uplink", action="store_true", help="with an [uplink] section")
    args = parser.parse_args()
    # abspath, not resolve(): a venv's python is a symlink to the system interpreter.
    asyncio.run(main(args.seconds, os.path.abspath(args.python), args.uplink))
