"""``evcp demo``: the agent on simulated hardware charges a car through a local CSMS.

Everything is real except the car: a throw-away CA and a WSS CSMS (built with ``ocpp``) on
127.0.0.1 with Basic Auth, the agent as its own process (``evcp run``), the OpenEVSE
controller simulator on a pty and the Modbus meter simulator on TCP. The demo plays one
session and prints a timeline of what crossed the wire:

plug in -> RemoteStartTransaction -> charging with MeterValues -> TxProfile limit 0 A
(SuspendedEVSE) -> TxProfile limit 16 A (Charging) -> RemoteStopTransaction -> unplug.

Exit 0 when the session completed and the energy the CSMS was told equals the meter's.

``evcp demo --serve`` plays nothing: the CSMS and the agent stay up on the simulated
hardware, the config path is printed, and a newcomer drives the charger with ``evcp sim
... --config <path>`` and watches it with ``evcp status --config <path>`` while the
messages scroll by; Ctrl-C (or SIGTERM) stops the agent and the CSMS and removes the
directory (unless ``--keep``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.control import request as control_request

CP_ID = "EVCP-DEMO-1"
TAG = "DEMO-TAG-01"


class DemoFailed(Exception):
    pass


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, arrow: str, text: str) -> None:
        print(f"{time.monotonic() - self.t0:7.2f}s  {arrow:<12} {text}", flush=True)


def _describe(action: str, p: dict[str, Any]) -> str:
    if action == "BootNotification":
        return f"BootNotification {p['chargePointVendor']} {p['chargePointModel']} fw {p.get('firmwareVersion')}"
    if action == "StatusNotification":
        code = "" if p["errorCode"] == "NoError" else f" ({p['errorCode']})"
        return f"StatusNotification connector {p['connectorId']}: {p['status']}{code}"
    if action == "StartTransaction":
        return f"StartTransaction idTag {p['idTag']}, meterStart {p['meterStart']} Wh"
    if action == "StopTransaction":
        return f"StopTransaction #{p['transactionId']}, meterStop {p['meterStop']} Wh, reason {p.get('reason')}"
    if action == "MeterValues":
        parts = []
        for mv in p["meterValue"]:
            for sv in mv["sampledValue"]:
                name = {
                    "Energy.Active.Import.Register": "E",
                    "Power.Active.Import": "P",
                    "Current.Offered": "offered",
                }.get(sv.get("measurand", ""))
                if name:
                    parts.append(f"{name}={sv['value']} {sv.get('unit', '')}".strip())
        return "MeterValues " + ", ".join(parts)
    return action


def run_demo(
    *, time_scale: float = 60.0, keep: bool = False, verbose: bool = False, serve: bool = False
) -> int:
    try:
        import trustme  # noqa: F401
    except ImportError:
        print("evcp demo needs the demo extra: pip install 'evcp[demo]'", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="evcp-demo-"))
    try:
        return asyncio.run(_demo(workdir, time_scale=time_scale, verbose=verbose, serve=serve))
    except DemoFailed as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        log = workdir / "agent.log"
        if log.exists():
            print("--- last lines of the agent's log ---", file=sys.stderr)
            print("\n".join(log.read_text().splitlines()[-25:]), file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"(state kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _demo(workdir: Path, *, time_scale: float, verbose: bool, serve: bool = False) -> int:
    import trustme
    from ocpp.v16 import call

    from agent.ocpp.csms import Csms

    tl = Timeline()
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = workdir / "csms-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_cert.configure_cert(server_ctx)

    password = secrets.token_urlsafe(18)
    csms = Csms(passwords={CP_ID: password}, boot_response=("Accepted", 300))
    csms.listener = lambda item: tl.say("CP -> CSMS", _describe(item.action, item.payload))
    await csms.start(server_ctx)
    tl.say("csms", f"listening on wss://localhost:{csms.port}/ocpp (TLS, Basic Auth)")

    config = workdir / "evcp.toml"
    config.write_text(
        f"""# written by evcp demo
[csms]
url = "wss://localhost:{csms.port}/ocpp"
charge_point_id = "{CP_ID}"
password = "{password}"
ca_file = "{ca_file}"
reconnect_min_s = 0.5

[agent]
state_dir = "{workdir / "state"}"
control_socket = "{workdir / "control.sock"}"
stage_dir = "{workdir / "run"}"
log_level = "info"
log_target = "stderr"

[time]
ntp_servers = []

[identity]
vendor = "evcp"
model = "evcp-demo"
serial_number = "DEMO-0001"

[hardware]
driver = "sim"
connectors = 1
max_current_a = 32
phases = 3
meter_poll_s = 1

[sim]
time_scale = {time_scale}
ev_max_current_a = 32

[ocpp]
MeterValueSampleInterval = 2
MeterValuesSampledData = "Energy.Active.Import.Register,Power.Active.Import,Current.Import,Voltage,Current.Offered"
"""
    )
    log_file = (workdir / "agent.log").open("wb")
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config),
        stdout=log_file, stderr=None if verbose else log_file,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # Ctrl-C reaches the demo, which stops the agent in order
    )  # fmt: skip
    tl.say("agent", f"started: evcp run --config {config} (pid {agent.pid})")

    async def sim(cmd: str, **extra: Any) -> None:
        payload = {"cmd": "sim", "request": {"cmd": cmd, "connector": 1, **extra}}
        answer = await asyncio.to_thread(control_request, workdir / "control.sock", payload)
        if not answer.get("ok"):
            raise DemoFailed(f"sim {cmd}: {answer.get('error')}")
        tl.say("sim", f"{cmd}")

    async def expect(action: str, match: Any, what: str, timeout_s: float = 20.0) -> Any:
        waiting = asyncio.ensure_future(
            csms.wait_message(action, match, after=mark[0], timeout_s=timeout_s)
        )
        died = asyncio.ensure_future(agent.wait())
        try:
            await asyncio.wait({waiting, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not waiting.done():  # the agent exited first: say so now, not after the timeout
            waiting.cancel()
            raise DemoFailed(
                f"the agent exited (status {agent.returncode}) while waiting for {what}"
            )
        try:
            return waiting.result()
        except TimeoutError:
            raise DemoFailed(f"timed out waiting for {what}") from None

    async def to_cp(label: str, payload: Any) -> dict[str, Any]:
        tl.say("CSMS -> CP", label)
        result = await csms.call(CP_ID, payload)
        tl.say("CP -> CSMS", f"  answer: {result}")
        return result

    def status_is(status: str) -> Any:
        return lambda p: p["connectorId"] == 1 and p["status"] == status

    mark = [0]
    try:
        await expect("BootNotification", None, "BootNotification", timeout_s=30)
        await expect("StatusNotification", status_is("Available"), "connector 1 Available")
        await _wait_control(workdir / "control.sock")
        if serve:
            return await _serve(config, tl, agent)

        mark[0] = len(csms.received)
        await sim("plug")
        await expect("StatusNotification", status_is("Preparing"), "Preparing after plug-in")

        mark[0] = len(csms.received)
        await to_cp(f"RemoteStartTransaction idTag {TAG}",
                    call.RemoteStartTransaction(id_tag=TAG, connector_id=1))  # fmt: skip
        start = await expect("StartTransaction", None, "StartTransaction")
        await expect("StatusNotification", status_is("Charging"), "Charging")
        tx_id = await _transaction_id(workdir / "control.sock")
        await expect("MeterValues", lambda p: p.get("transactionId") == tx_id, "MeterValues")
        mark[0] = len(csms.received)
        await expect("MeterValues", lambda p: p.get("transactionId") == tx_id, "MeterValues")

        mark[0] = len(csms.received)
        profile: dict[str, Any] = {
            "chargingProfileId": 1,
            "stackLevel": 0,
            "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 0}],
            },
        }
        await to_cp("SetChargingProfile TxProfile limit 0 A (pause)",
                    call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile))  # fmt: skip
        await expect("StatusNotification", status_is("SuspendedEVSE"), "SuspendedEVSE")
        await expect(
            "MeterValues",
            lambda p: _power(p) == 0.0,
            "MeterValues with no power while paused",
        )

        mark[0] = len(csms.received)
        profile["chargingSchedule"]["chargingSchedulePeriod"] = [{"startPeriod": 0, "limit": 16}]
        await to_cp("SetChargingProfile TxProfile limit 16 A (resume)",
                    call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile))  # fmt: skip
        await expect("StatusNotification", status_is("Charging"), "Charging again")
        await expect("MeterValues", lambda p: (_power(p) or 0) > 0, "MeterValues with power")

        mark[0] = len(csms.received)
        await to_cp(f"RemoteStopTransaction #{tx_id}",
                    call.RemoteStopTransaction(transaction_id=tx_id))  # fmt: skip
        stop = await expect("StopTransaction", None, "StopTransaction")
        await expect("StatusNotification", status_is("Finishing"), "Finishing")

        mark[0] = len(csms.received)
        await sim("unplug")
        await expect("StatusNotification", status_is("Available"), "Available after unplug")

        energy = stop.payload["meterStop"] - start.payload["meterStart"]
        errors = len(csms.errors)
        print()
        print(f"Session complete: transaction {tx_id}, {energy} Wh delivered "
              f"(meterStart {start.payload['meterStart']} Wh, meterStop {stop.payload['meterStop']} Wh).")  # fmt: skip
        print(f"Messages from the charge point: {len(csms.received)}, "
              f"schema violations: {errors}.")  # fmt: skip
        if energy <= 0:
            raise DemoFailed("no energy was delivered")
        if errors:
            raise DemoFailed(f"the CSMS rejected {errors} message(s)")
        return 0
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(agent.wait(), 10)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        log_file.close()
        await csms.stop()


async def _serve(config: Path, tl: Timeline, agent: asyncio.subprocess.Process) -> int:
    """Stay up until Ctrl-C or SIGTERM (0), or until the agent exits on its own (1)."""
    print(
        f"""
The demo CSMS and the agent run on simulated hardware. In another terminal:

    evcp status --config {config}
    evcp sim plug 1 --config {config}
    evcp sim swipe {TAG} --config {config}      (any idTag is accepted)
    evcp sim unplug 1 --config {config}
    evcp tx --config {config}

Config: {config}
The agent's log: {config.parent / "agent.log"}
Stop with Ctrl-C: the agent and the CSMS stop, and their directory is removed (--keep
keeps it).
""",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    died = asyncio.ensure_future(agent.wait())
    try:
        await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        died.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if stop.is_set():
        tl.say("demo", "stopping")
        return 0
    print(f"evcp demo: the agent exited (status {agent.returncode})", file=sys.stderr)
    return 1


def _power(payload: dict[str, Any]) -> float | None:
    for mv in payload["meterValue"]:
        for sv in mv["sampledValue"]:
            if sv.get("measurand") == "Power.Active.Import":
                return float(sv["value"])
    return None


async def _wait_control(path: Path) -> None:
    for _ in range(100):
        if path.exists():
            answer = await asyncio.to_thread(control_request, path, {"cmd": "status"})
            if answer.get("phase") == "running":
                return
        await asyncio.sleep(0.1)
    raise DemoFailed("the agent's control socket did not appear")


async def _transaction_id(path: Path) -> int:
    for _ in range(100):
        answer = await asyncio.to_thread(control_request, path, {"cmd": "status"})
        tx = answer["connectors"][0]["transaction_id"]
        if tx is not None:
            return int(tx)
        await asyncio.sleep(0.1)
    raise DemoFailed("the agent never learnt its transaction id")
