"""The RAPI driver against the OpenEVSE simulator over a real pseudo-terminal (no mocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import serial_asyncio_fast

from drivers.base import (
    ControlMode,
    DeviceTimeout,
    EvseController,
    EvseStatus,
    FatalDriverError,
    FaultCode,
    ProtocolError,
    VehicleState,
)
from drivers.evse.rapi import (
    RapiController,
    RapiFrame,
    checksum_xor,
    encode_command,
    parse_frame,
)
from drivers.sim.physics import SimConnector
from drivers.sim.rapi_device import RapiDevice

TIMEOUT_S = 0.3
RETRIES = 2


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@dataclass
class Rig:
    connector: SimConnector
    device: RapiDevice
    ctrl: RapiController
    statuses: list[EvseStatus] = field(default_factory=list)

    def commands_since(self, index: int) -> list[RapiFrame]:
        return self.device.commands[index:]


async def make_rig(
    *, device_kwargs: dict[str, int | str] | None = None, **ctrl_kwargs: float
) -> Rig:
    connector = SimConnector()
    device = RapiDevice(connector, **(device_kwargs or {}))  # type: ignore[arg-type]
    path = await device.start()
    kwargs: dict[str, float] = {
        "timeout_s": TIMEOUT_S,
        "retries": RETRIES,
        "heartbeat_interval_s": 10,
        "supervision_timeout_s": 30,
        "poll_interval_s": 30,
    }
    kwargs.update(ctrl_kwargs)
    ctrl = RapiController(port=path, **kwargs)  # type: ignore[arg-type]
    rig = Rig(connector, device, ctrl)
    ctrl.set_listener(rig.statuses.append)
    await ctrl.start()
    return rig


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig()
    yield r
    await r.ctrl.close()
    await r.device.stop()


# --------------------------------------------------------------------------- start


async def test_start_reads_firmware_capabilities_and_configures_supervision() -> None:
    r = await make_rig(
        device_kwargs={"firmware": "7.1.3", "min_current_a": 8, "max_current_a": 40},
        supervision_timeout_s=45,
        fallback_current_a=10,
    )
    try:
        controller: EvseController = r.ctrl  # structural check by mypy, too
        assert isinstance(controller, EvseController)
        caps = r.ctrl.capabilities
        assert (caps.firmware, caps.min_current_a, caps.max_current_a) == ("7.1.3", 8.0, 40.0)
        assert caps.supports_unlock is False
        assert await r.ctrl.unlock() is False
        sy = [c for c in r.device.commands if c.kind == "SY"]
        assert sy[0].tokens == ("45", "10")
        # The initial state is pushed to the listener.
        assert r.statuses[0].vehicle is VehicleState.ABSENT
        assert r.statuses[0].offered_current_a == 32.0  # the pilot current read by $GC
    finally:
        await r.ctrl.close()
        await r.device.stop()


async def test_start_on_a_missing_port_is_fatal() -> None:
    ctrl = RapiController(port="/dev/does-not-exist-rapi", timeout_s=TIMEOUT_S)
    with pytest.raises(FatalDriverError, match="does-not-exist-rapi"):
        await ctrl.start()


async def test_every_command_carries_a_sequence_id_and_an_xor_checksum(rig: Rig) -> None:
    await rig.ctrl.read_status()
    assert rig.device.commands
    for cmd in rig.device.commands:
        assert cmd.seq is not None
        assert cmd.checksum == "xor"


async def test_sequence_ids_wrap_from_ff_to_01_skipping_00(rig: Rig) -> None:
    for _ in range(300):
        await rig.ctrl.request("GS")
    seqs = [c.seq for c in rig.device.commands]
    assert None not in seqs
    assert 0 not in seqs
    i = seqs.index(0xFF)
    assert seqs[i + 1] == 0x01


async def test_close_and_start_again(rig: Rig) -> None:
    await rig.ctrl.close()
    await rig.ctrl.close()  # idempotent
    await rig.ctrl.start()
    status = await rig.ctrl.read_status()
    assert status.vehicle is VehicleState.ABSENT


# --------------------------------------------------------------------------- control


async def test_enable_pause_disable_drive_the_pilot(rig: Rig) -> None:
    rig.connector.ev.plugged = True
    rig.connector.changed()
    await wait_until(
        lambda: rig.ctrl.last_status is not None and rig.ctrl.last_status.contactor_closed
    )

    await rig.ctrl.pause()
    assert rig.connector.pilot_on is False
    assert rig.connector.contactor_closed is False
    status = await rig.ctrl.read_status()
    assert (status.vehicle, status.mode) == (VehicleState.CONNECTED, ControlMode.PAUSED)
    assert status.vendor_code == "FE"

    await rig.ctrl.disable()
    assert rig.device.mode == "disabled"
    status = await rig.ctrl.read_status()
    assert (status.vehicle, status.mode) == (VehicleState.CONNECTED, ControlMode.DISABLED)

    await rig.ctrl.enable()
    assert rig.connector.pilot_on is True
    assert rig.connector.contactor_closed is True
    status = await rig.ctrl.read_status()
    assert (status.vehicle, status.mode) == (VehicleState.CHARGING, ControlMode.ENABLED)


@pytest.mark.parametrize("amps", [6, 16, 32])
async def test_set_offered_current(rig: Rig, amps: int) -> None:
    assert await rig.ctrl.set_offered_current(amps) == float(amps)
    assert rig.connector.offered_current_a == float(amps)
    sc = [c for c in rig.device.commands if c.kind == "SC"][-1]
    assert sc.tokens == (str(amps), "V")  # volatile: never written to EEPROM
    await wait_until(lambda: rig.statuses[-1].offered_current_a == float(amps))


async def test_set_offered_current_rounds_down(rig: Rig) -> None:
    assert await rig.ctrl.set_offered_current(13.9) == 13.0
    assert rig.connector.offered_current_a == 13.0


async def test_current_above_the_maximum_is_clamped_and_reported(rig: Rig) -> None:
    with pytest.raises(ProtocolError, match="32 A"):
        await rig.ctrl.set_offered_current(40)
    assert rig.connector.offered_current_a == 32.0


async def test_current_below_the_minimum_is_refused_without_sending(rig: Rig) -> None:
    await rig.ctrl.set_offered_current(16)
    sent = len(rig.device.commands)
    with pytest.raises(ProtocolError, match="below"):
        await rig.ctrl.set_offered_current(5)
    assert len(rig.device.commands) == sent
    assert rig.connector.offered_current_a == 16.0


async def test_raising_current_while_over_temperature_is_refused(rig: Rig) -> None:
    await rig.ctrl.set_offered_current(10)
    rig.connector.fault = FaultCode.OVER_TEMPERATURE.value
    rig.connector.changed()
    with pytest.raises(ProtocolError, match="10 A"):
        await rig.ctrl.set_offered_current(20)
    assert rig.connector.offered_current_a == 10.0
    assert await rig.ctrl.set_offered_current(8) == 8.0


# --------------------------------------------------------------------------- notifications


async def test_plugging_the_ev_notifies_connected_then_charging(rig: Rig) -> None:
    await rig.ctrl.set_offered_current(16)
    rig.statuses.clear()
    rig.connector.ev.plugged = True
    rig.connector.changed()
    await wait_until(lambda: len(rig.statuses) >= 2)
    assert [s.vehicle for s in rig.statuses] == [VehicleState.CONNECTED, VehicleState.CHARGING]
    assert rig.statuses[0].contactor_closed is False
    assert rig.statuses[1].contactor_closed is True
    status = await rig.ctrl.read_status()
    assert status.current_a == 16.0
    assert status.voltage_v == 230.0


async def test_ev_that_does_not_ask_for_power_is_connected_not_charging(rig: Rig) -> None:
    rig.connector.ev.plugged = True
    rig.connector.ev.wants_power = False
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CONNECTED)
    rig.connector.ev.wants_power = True
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CHARGING)
    rig.connector.ev.plugged = False
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.ABSENT)
    assert rig.statuses[-1].contactor_closed is False


async def test_fault_is_notified_and_cleared(rig: Rig) -> None:
    rig.connector.ev.plugged = True
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CHARGING)

    rig.connector.fault = "ground_fault"
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.FAULT)
    fault = rig.statuses[-1]
    assert fault.fault is FaultCode.GROUND_FAULT
    assert fault.vendor_code == "06"
    assert fault.contactor_closed is False
    assert (await rig.ctrl.read_status()).fault is FaultCode.GROUND_FAULT
    gf = await rig.ctrl.request("GF")
    assert gf.tokens[0] == "1"  # the GFI trip counter

    rig.connector.fault = None
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CHARGING)
    assert rig.statuses[-1].fault is None


async def test_async_state_arriving_before_the_reply(rig: Rig) -> None:
    early = encode_command("AT", "02", "02", 20, "0100")

    def at_first(cmd: RapiFrame, reply: bytes) -> bytes:
        return early + reply if cmd.kind == "SC" else reply

    rig.device.reply_hook = at_first
    assert await rig.ctrl.set_offered_current(20) == 20.0
    assert any(
        s.vehicle is VehicleState.CONNECTED and s.offered_current_a == 20.0 for s in rig.statuses
    )


@pytest.mark.parametrize("after", ["GS", "GG"])
async def test_async_state_after_a_state_reply_is_not_overwritten_by_it(
    rig: Rig, after: str
) -> None:
    # The controller answers $GS (and $GG), then a fault happens and its $AT follows at once
    # (one read for both): the reply is older than the $AT and must not undo it.
    fault = encode_command("AT", "06", "01", 32, "0080")

    def fault_after(cmd: RapiFrame, reply: bytes) -> bytes:
        if cmd.kind != after or rig.connector.fault is not None:
            return reply
        rig.connector.fault = FaultCode.GROUND_FAULT.value  # $GS answers it from now on
        return reply + fault

    rig.device.reply_hook = fault_after
    status = await rig.ctrl.read_status()
    assert status.fault is FaultCode.GROUND_FAULT
    assert rig.statuses[-1].fault is FaultCode.GROUND_FAULT
    rig.device.reply_hook = None


# --------------------------------------------------------------------------- line faults


def reseq(reply: bytes, seq: int) -> bytes:
    frame = parse_frame(reply)
    return encode_command(frame.kind, *frame.tokens, seq=seq)


async def test_reply_with_the_wrong_sequence_id_is_ignored(rig: Rig) -> None:
    tampered: list[int] = []

    def wrong_seq_once(cmd: RapiFrame, reply: bytes) -> bytes:
        if cmd.kind == "GV" and not tampered:
            assert cmd.seq is not None
            tampered.append(cmd.seq)
            return reseq(reply, cmd.seq % 255 + 2)
        return reply

    rig.device.reply_hook = wrong_seq_once
    sent = len(rig.device.commands)
    reply = await rig.ctrl.request("GV")
    assert reply.tokens[0] == "8.2.1-sim"
    gv = [c for c in rig.commands_since(sent) if c.kind == "GV"]
    assert len(gv) == 2  # the first reply was dropped; the retry was answered
    assert gv[0].seq != gv[1].seq


async def test_replies_always_with_the_wrong_sequence_id_time_out(rig: Rig) -> None:
    def wrong_seq(cmd: RapiFrame, reply: bytes) -> bytes:
        assert cmd.seq is not None
        return reseq(reply, cmd.seq % 255 + 2)

    rig.device.reply_hook = wrong_seq
    sent = len(rig.device.commands)
    with pytest.raises(DeviceTimeout):
        await rig.ctrl.request("GV")
    assert len(rig.commands_since(sent)) == RETRIES + 1
    rig.device.reply_hook = None
    assert (await rig.ctrl.request("GV")).tokens[0] == "8.2.1-sim"


async def test_garbage_on_the_line_does_not_break_the_session(rig: Rig) -> None:
    dropped = rig.ctrl.frames_dropped
    rig.device.inject_bytes(b"\x00\xff\xfegarbage$OK 1$AT 03 0")
    rig.device.inject_bytes(b"$OK 01 0 01 0000 :01^00\r")  # bad checksum
    rig.device.inject_bytes(b"$AT " + b"7" * 80 + b"\r")  # over-long
    status = await rig.ctrl.read_status()
    assert status.vehicle is VehicleState.ABSENT
    assert rig.ctrl.frames_dropped >= dropped + 3
    assert await rig.ctrl.set_offered_current(12) == 12.0


async def test_garbage_right_before_a_reply_is_resynced(rig: Rig) -> None:
    def garbage_first(cmd: RapiFrame, reply: bytes) -> bytes:
        return b"\x13$OK 99 :1" + reply

    rig.device.reply_hook = garbage_first
    assert await rig.ctrl.set_offered_current(14) == 14.0


async def test_silent_controller_times_out_after_retries_and_recovers(rig: Rig) -> None:
    rig.connector.ev.plugged = True
    rig.connector.changed()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CHARGING)
    rig.device.silent = True
    sent = len(rig.device.commands)
    with pytest.raises(DeviceTimeout, match="after 3 attempts"):
        await rig.ctrl.read_status()
    assert len(rig.commands_since(sent)) == RETRIES + 1
    lost = rig.statuses[-1]
    assert (lost.vehicle, lost.fault) == (VehicleState.FAULT, FaultCode.COMMUNICATION)

    rig.device.silent = False
    await rig.ctrl.read_status()
    await wait_until(lambda: rig.statuses[-1].vehicle is VehicleState.CHARGING)


async def test_controller_reboot_reapplies_current_and_mode(rig: Rig) -> None:
    rig.connector.ev.plugged = True
    rig.connector.changed()
    await rig.ctrl.set_offered_current(16)
    await rig.ctrl.pause()
    assert rig.connector.pilot_on is False
    rig.statuses.clear()
    before = len(rig.device.commands)

    rig.device.reset()
    # The reboot lost the volatile settings...
    assert rig.device.current_a == 32
    assert rig.device.mode == "enabled"
    # ...and the driver puts them back.
    await wait_until(lambda: rig.device.current_a == 16 and rig.device.mode == "sleeping")
    assert rig.connector.pilot_on is False
    assert rig.connector.offered_current_a == 16.0
    sent = [(c.kind, c.tokens) for c in rig.commands_since(before)]
    assert ("SY", ("30", "6")) in sent
    assert ("SC", ("16", "V")) in sent
    assert ("FS", ()) in sent
    await wait_until(
        lambda: (
            bool(rig.statuses)
            and rig.statuses[-1].mode is ControlMode.PAUSED
            and rig.statuses[-1].offered_current_a == 16.0
        )
    )


async def test_restart_command_reboots_and_driver_recovers(rig: Rig) -> None:
    await rig.ctrl.set_offered_current(10)
    before = len(rig.device.commands)
    await rig.ctrl.request("FR")  # the controller reboots right after its reply
    await wait_until(
        lambda: (
            any(c.kind == "SC" and c.tokens == ("10", "V") for c in rig.commands_since(before))
            and rig.device.current_a == 10
        )
    )


# --------------------------------------------------------------------------- supervision


async def test_controller_falls_back_when_heartbeats_stop() -> None:
    r = await make_rig(heartbeat_interval_s=0.2, supervision_timeout_s=1, fallback_current_a=6)
    try:
        await r.ctrl.set_offered_current(16)
        await asyncio.sleep(1.5)  # longer than the supervision timeout: heartbeats keep it
        assert r.device.current_a == 16
        assert not r.device.heartbeat_triggered
        await r.ctrl.close()  # the agent dies
        await wait_until(lambda: r.device.current_a == 6, timeout=3.0)
        assert r.connector.offered_current_a == 6.0
        assert r.device.heartbeat_triggered
    finally:
        await r.ctrl.close()
        await r.device.stop()


async def test_driver_acknowledges_a_missed_heartbeat_and_restores_current() -> None:
    r = await make_rig(heartbeat_interval_s=0.2, supervision_timeout_s=1, fallback_current_a=6)
    try:
        await r.ctrl.set_offered_current(16)
        r.device.silent = True  # heartbeats are lost on the line
        await wait_until(lambda: r.device.current_a == 6, timeout=3.0)
        r.device.silent = False
        await wait_until(
            lambda: r.device.current_a == 16 and not r.device.heartbeat_triggered, timeout=3.0
        )
        assert any(c.kind == "SY" and c.tokens == ("165",) for c in r.device.commands)
    finally:
        await r.ctrl.close()
        await r.device.stop()


async def test_safety_poll_catches_a_lost_notification() -> None:
    r = await make_rig(poll_interval_s=0.1)
    try:
        r.device.notify = False  # every $AT is lost on the line
        r.connector.ev.plugged = True
        r.connector.changed()
        await wait_until(lambda: r.statuses[-1].vehicle is VehicleState.CHARGING)
    finally:
        await r.ctrl.close()
        await r.device.stop()


# --------------------------------------------------------------------------- simulator fidelity


async def raw_exchange(path: str, data: bytes, wait: float = 0.2) -> bytes:
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=path, baudrate=115200)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                out += await asyncio.wait_for(reader.read(1024), deadline - time.monotonic())
            except TimeoutError:
                break
        return out
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def device() -> AsyncIterator[RapiDevice]:
    dev = RapiDevice(SimConnector())
    await dev.start()
    yield dev
    await dev.stop()


async def test_simulator_answers_all_checksum_kinds(device: RapiDevice) -> None:
    frames = b"$GV^35\r" + encode_command("GV", checksum="sum") + b"$GV :07\r"
    out = await raw_exchange(device.path, frames)
    replies = [parse_frame(line) for line in out.split(b"\r") if line]
    assert [r.kind for r in replies] == ["OK", "OK", "OK"]
    assert [r.seq for r in replies] == [None, None, 7]
    assert replies[0].tokens == ("8.2.1-sim", "5.2.1")


async def test_simulator_rejects_bad_checksum_and_unknown_commands(device: RapiDevice) -> None:
    unknown = b"$XX :0A"
    out = await raw_exchange(
        device.path, b"$GS :09^00\r" + unknown + b"^%02X\r" % checksum_xor(unknown)
    )
    replies = [parse_frame(line) for line in out.split(b"\r") if line]
    assert [(r.kind, r.seq) for r in replies] == [("NK", None), ("NK", 0x0A)]


async def test_simulator_discards_frames_longer_than_its_buffer(device: RapiDevice) -> None:
    too_long = encode_command("SC", "0" * 20 + "16", "V", seq=3)
    assert len(too_long) > 32
    out = await raw_exchange(device.path, too_long + encode_command("GE", seq=4))
    replies = [parse_frame(line) for line in out.split(b"\r") if line]
    assert [(r.kind, r.seq) for r in replies] == [("OK", 4)]
    assert device.current_a == 32
