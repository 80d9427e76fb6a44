"""Agent figures (prints, never asserts): start-up to BootNotification, memory, CPU.

Runs the real agent (`python -m agent run`) as a process on the simulated hardware against
a local WSS CSMS, then charges with ev.energy's settings (60 s sampling of
Energy.Active.Import.Register and Power.Active.Import) and measures the agent process only
(the simulators are a separate process, as the real devices would be):

- process start to BootNotification received by the CSMS (target <= 1.0 s);
- resident memory while charging (target <= 36 MiB);
- CPU time per hour of charging, as a share of one core (target <= 0.2 %).

Usage: python bench/bench_agent.py [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trustme
from ocpp.v16 import call

from agent.control import request
from agent.ocpp.csms import Csms

CP = "BENCH-1"
PASSWORD = "bench-password-0123456789"


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main(seconds: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="evcp-bench-"))
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    csms = Csms(passwords={CP: PASSWORD})
    await csms.start(ctx)
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
log_level = "warning"
[time]
ntp_servers = []
[hardware]
driver = "sim"
meter_poll_s = 60
[ocpp]
MeterValueSampleInterval = 60
MeterValuesSampledData = "Energy.Active.Import.Register,Power.Active.Import"
""")
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config)
    )
    print("agent started", file=sys.stderr, flush=True)
    await csms.wait_message("BootNotification", timeout_s=30)
    boot_s = time.monotonic() - t0
    await csms.wait_message("StatusNotification", timeout_s=10)
    sock = work / "control.sock"
    await asyncio.to_thread(request, sock, {"cmd": "sim", "request": {"cmd": "plug"}})
    await csms.call(CP, call.RemoteStartTransaction(id_tag="BENCH", connector_id=1))
    await csms.wait_message("StartTransaction", timeout_s=10)
    print("charging; measuring", file=sys.stderr, flush=True)
    await asyncio.sleep(5)  # settle
    cpu0, w0 = proc_cpu_s(proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, w1 = proc_cpu_s(proc.pid), time.monotonic()
    rss = proc_rss_mib(proc.pid)
    meter_values = len(csms.messages("MeterValues"))
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    await csms.stop()
    share = (cpu1 - cpu0) / (w1 - w0) * 100
    print(f"start to BootNotification on the wire: {boot_s:.2f} s (target <= 1.0 s)")
    print(f"resident memory while charging:        {rss:.1f} MiB (target <= 36 MiB)")
    print(f"CPU while charging at 60 s sampling:   {share:.3f} % of one core "
          f"= {(cpu1 - cpu0) / (w1 - w0) * 3600:.1f} s per hour (target <= 0.2 %)")  # fmt: skip
    print(f"(measured over {w1 - w0:.0f} s; {meter_values} MeterValues delivered)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    asyncio.run(main(parser.parse_args().seconds))
