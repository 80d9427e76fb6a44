"""Durable-queue figures (prints, never asserts): drain rate and bytes written per day.

1. Drain rate: a week of charging at 60 s sampling is queued in a state database
   (a StartTransaction, 10,080 MeterValues, a StopTransaction), then the real agent
   (`python -m agent run`) is started against a local WSS CSMS that answers at once (a
   bare WebSocket server: no schema validation, so that the agent is what is measured);
   the rate is the number of messages over the time from the first to the last one
   received (target >= 800 messages/s).
2. Bytes written to disk per day of charging at 60 s sampling: the agent charges with
   MeterValueSampleInterval = 60 and the default meter polling; ``write_bytes`` of
   ``/proc/<pid>/io`` (the agent process only; the simulators are another process) is
   read after a settling time and after ``--seconds`` more, and extrapolated to a day
   (target <= 5 MB/day). For scale it also prints the same figure for the smallest
   durable write there is: one 100-byte append and fsync per minute on the same file
   system (the kernel counts every page it must write again, not the bytes changed).
   Measured twice: as configured by default (``[agent] queue_flush_s = 10``: MeterValues
   staged on a tmpfs -- /dev/shm here, /run on a charger -- and written to disk only if not
   acknowledged within 10 s), and with ``queue_flush_s = 0`` (every MeterValues committed
   to disk before it is sent).

Usage: python bench/bench_queue.py [--messages 10080] [--seconds 300] [--skip-disk]
       [--modes stage,disk]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trustme
from ocpp.v16 import call
from websockets.asyncio.server import serve

from agent.control import request
from agent.ocpp.csms import Csms
from agent.ocpp.session import TRANSACTION_ACTIONS
from agent.store import Store

CP = "BENCH-Q"
PASSWORD = "bench-password-0123456789"


def scratch(prefix: str, dir: Path | str | None = None) -> Path:
    """A temporary directory removed when the bench exits, after a failure too (atexit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sample(ts: datetime, energy_wh: int) -> dict[str, object]:
    """A MeterValues as the agent queues it with its default MeterValuesSampledData."""

    def sv(measurand: str, value: str, unit: str, phase: str | None = None) -> dict[str, str]:
        entry = {"value": value, "context": "Sample.Periodic", "format": "Raw",
                 "measurand": measurand, "location": "Outlet", "unit": unit}  # fmt: skip
        if phase:
            entry["phase"] = phase
        return entry

    values = [sv("Energy.Active.Import.Register", str(energy_wh), "Wh"),
              sv("Power.Active.Import", "11040.0", "W")]  # fmt: skip
    values += [sv("Current.Import", "16.00", "A", p) for p in ("L1", "L2", "L3")]
    values += [sv("Voltage", "230.0", "V", f"{p}-N") for p in ("L1", "L2", "L3")]
    values.append(sv("Current.Offered", "16.0", "A"))
    return {"connectorId": 1, "transactionId": 0,
            "meterValue": [{"timestamp": iso(ts), "sampledValue": values}]}  # fmt: skip


def fill(state_dir: Path, messages: int) -> None:
    store = Store.open(state_dir)
    start = datetime.now(UTC) - timedelta(minutes=messages + 1)
    local = store.begin_transaction(connector_id=1, id_tag="BENCH", meter_start_wh=0,
                                    start_ts=iso(start), reservation_id=None,
                                    start_payload={"connectorId": 1, "idTag": "BENCH",
                                                   "meterStart": 0, "timestamp": iso(start)})  # fmt: skip
    for n in range(1, messages + 1):
        store.enqueue("MeterValues", sample(start + timedelta(minutes=n), n * 184), local)
    stop = start + timedelta(minutes=messages + 1)
    store.end_transaction(local, meter_stop_wh=messages * 184, stop_ts=iso(stop), reason="Local",
                          stop_payload={"transactionId": 0, "meterStop": messages * 184,
                                        "timestamp": iso(stop), "reason": "Local"})  # fmt: skip
    store.close()


def write_config(work: Path, port: int, name: str, ocpp: str, agent: str = "") -> Path:
    config = work / f"{name}.toml"
    config.write_text(f"""
[csms]
url = "wss://localhost:{port}/ocpp"
charge_point_id = "{CP}"
password = "{PASSWORD}"
ca_file = "{work / "ca.pem"}"
reconnect_min_s = 0.1
reconnect_max_s = 1
[agent]
state_dir = "{work / name}"
control_socket = "{work / name / "control.sock"}"
log_level = "warning"
{agent}
[time]
ntp_servers = []
[hardware]
driver = "sim"
[ocpp]
{ocpp}
""")
    return config


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/<pid>/io")


def floor_bytes_per_day(directory: Path) -> float:
    """write_bytes of one 100-byte append + fsync per minute, as if the kernel had
    written the page back in between (it does within 30 s)."""
    path = directory / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        total = 0
        for _ in range(20):
            os.sync()
            before = write_bytes(os.getpid())
            os.write(fd, b"x" * 100)
            os.fsync(fd)
            total += write_bytes(os.getpid()) - before
    finally:
        os.close(fd)
    return total / 20 * 1440


async def start_agent(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def stop_agent(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


class FastCsms:
    """A CSMS that answers every CALL at once: no schema validation, no bookkeeping but a
    list of ``(monotonic time, action, payload)`` -- what the drain rate is measured
    against (the library-based test CSMS would measure itself)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        self.stopped = asyncio.Event()
        self.port = 0
        self._server: Any = None
        self._tx = 5000

    def _result(self, action: str) -> dict[str, Any]:
        now = iso(datetime.now(UTC))
        if action == "BootNotification":
            return {"status": "Accepted", "currentTime": now, "interval": 300}
        if action == "Heartbeat":
            return {"currentTime": now}
        if action == "StartTransaction":
            self._tx += 1
            return {"transactionId": self._tx, "idTagInfo": {"status": "Accepted"}}
        if action in ("Authorize", "StopTransaction"):
            return {"idTagInfo": {"status": "Accepted"}}
        return {}

    async def _handler(self, ws: Any) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame[0] != 2:
                continue
            self.received.append((time.monotonic(), frame[2], frame[3]))
            await ws.send(json.dumps([3, frame[1], self._result(frame[2])]))
            if frame[2] == "StopTransaction":
                self.stopped.set()

    async def start(self, ctx: ssl.SSLContext) -> None:
        self._server = await serve(self._handler, "127.0.0.1", 0, ssl=ctx,
                                   subprotocols=["ocpp1.6"])  # type: ignore[list-item]  # fmt: skip
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()


def ram_dir(work: Path) -> Path:
    """A directory for the stage in RAM, as /run/evcp is on a charger: /dev/shm here."""
    shm = Path("/dev/shm")
    return scratch("evcp-bench-stage-", shm if shm.is_dir() else work)


async def drain(work: Path, ctx: ssl.SSLContext, messages: int) -> None:
    fill(work / "drain", messages)
    fast = FastCsms()
    await fast.start(ctx)
    stage = ram_dir(work)  # (the default config; the queue is in the state file already)
    config = write_config(work, fast.port, "drain", "", f'stage_dir = "{stage}"')
    t_start = time.monotonic()
    proc = await start_agent(config)
    try:
        await asyncio.wait_for(fast.stopped.wait(), 600)
    finally:
        await stop_agent(proc)
        await fast.stop()
        shutil.rmtree(stage, ignore_errors=True)
    got = [(t, a, p) for t, a, p in fast.received if a in TRANSACTION_ACTIONS]
    t0, t1 = got[0][0], got[-1][0]
    boot = fast.received[0][0] - t_start
    meter_values = [p for _, a, p in got if a == "MeterValues"]
    stamps = [p["meterValue"][0]["timestamp"] for p in meter_values]
    in_order = stamps == sorted(stamps) and got[0][1] == "StartTransaction"
    print(f"drain: {len(meter_values)} queued MeterValues (+ Start and Stop) delivered over TLS"
          f" in {t1 - t0:.1f} s = {(len(got) - 1) / (t1 - t0):.0f} messages/s (target >= 800);"
          f" in order: {in_order}; agent start to BootNotification {boot:.2f} s")  # fmt: skip


async def disk(work: Path, csms: Csms, seconds: float, mode: str) -> None:
    agent = f'queue_flush_s = 0\nstage_dir = "{work / "no-stage"}"'  # (never the host's /run)
    stage = work  # (only removed for the stage mode)
    where = "queue_flush_s = 0: every MeterValues committed to disk before it is sent"
    if mode == "stage":
        stage = ram_dir(work)
        agent = f'stage_dir = "{stage}"'
        where = f"default, queue_flush_s = 10: MeterValues staged in {stage}"
    config = write_config(
        work, csms.port, f"disk-{mode}",
        'MeterValueSampleInterval = 60\n'
        'MeterValuesSampledData = "Energy.Active.Import.Register,Power.Active.Import,'
        'Current.Import,Voltage,Current.Offered"',
        agent,
    )  # fmt: skip
    mark = len(csms.received)
    proc = await start_agent(config)
    try:
        await csms.wait_message("StatusNotification", after=mark, timeout_s=30)
        sock = work / f"disk-{mode}" / "control.sock"
        await asyncio.to_thread(request, sock, {"cmd": "sim", "request": {"cmd": "plug"}})
        await csms.call(CP, call.RemoteStartTransaction(id_tag="BENCH", connector_id=1))
        await csms.wait_message("StartTransaction", after=mark, timeout_s=10)
        print(f"charging at 60 s sampling; measuring for {seconds:.0f} s", file=sys.stderr)
        await asyncio.sleep(30)  # settle: start-up writes are not charging writes
        b0, t0 = write_bytes(proc.pid), time.monotonic()
        samples0 = len(csms.messages("MeterValues"))
        await asyncio.sleep(seconds)
        b1, t1 = write_bytes(proc.pid), time.monotonic()
        samples = len(csms.messages("MeterValues")) - samples0
    finally:
        await stop_agent(proc)
        if mode == "stage":
            shutil.rmtree(stage, ignore_errors=True)  # RAM
    per_day = (b1 - b0) / (t1 - t0) * 86400
    print(f"disk ({where}): {b1 - b0} bytes written by the agent in {t1 - t0:.0f} s of"
          f" charging ({samples} MeterValues) = {per_day / 1e6:.1f} MB/day"
          " (target <= 5 MB/day)")  # fmt: skip


async def main(messages: int, seconds: float, skip_disk: bool, modes: list[str]) -> None:
    work = scratch("evcp-bench-queue-", "/var/tmp")
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    await drain(work, ctx, messages)
    if not skip_disk:
        csms = Csms(passwords={CP: PASSWORD})
        await csms.start(ctx)
        try:
            for mode in modes:
                await disk(work, csms, seconds, mode)
        finally:
            await csms.stop()
        print(f"      floor on this file system (one 100-byte append + fsync a minute): "
              f"{floor_bytes_per_day(work) / 1e6:.1f} MB/day")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_080)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument(
        "--modes", default="stage,disk", help="stage (the default config), disk, or both"
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("disk", "stage") for m in modes):
        parser.error("--modes takes disk, stage or disk,stage")
    asyncio.run(main(args.messages, args.seconds, args.skip_disk, modes))
