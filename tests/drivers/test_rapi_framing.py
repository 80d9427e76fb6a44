"""Pure tests of the OpenEVSE RAPI framing and state mapping (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import ControlMode, FaultCode, ProtocolError, VehicleState
from drivers.evse.rapi import (
    EV_CONNECTED,
    FLAG_CHARGING_ON,
    RapiFrame,
    RapiFramer,
    checksum_sum,
    checksum_xor,
    encode_command,
    parse_frame,
    status_from_state,
)

# --------------------------------------------------------------------------- checksums


@pytest.mark.parametrize(
    ("body", "chk"),
    [
        (b"$GS", 0x30),
        (b"$GG", 0x24),
        (b"$GE", 0x26),
        (b"$GC", 0x20),
        (b"$GV", 0x35),
        (b"$GU", 0x36),
        (b"$G0", 0x53),
        (b"$FE", 0x27),
        (b"$FD", 0x26),
        (b"$FS", 0x31),
        (b"$FR", 0x30),
        (b"$SC 16", 0x13),
        (b"$SC 32 V", 0x63),
        (b"$GS :01", 0x2B),
        (b"$SY", 0x2E),
    ],
)
def test_xor_checksum_matches_the_documented_examples(body: bytes, chk: int) -> None:
    assert checksum_xor(body) == chk


def test_legacy_sum_checksum_matches_the_header_example() -> None:
    assert checksum_sum(b"$FE") == 0xAF
    assert encode_command("FE", checksum="sum") == b"$FE*AF\r"


@pytest.mark.parametrize(
    ("args", "kwargs", "frame"),
    [
        (("GS",), {}, b"$GS^30\r"),
        (("FE",), {}, b"$FE^27\r"),
        (("SC", 16), {}, b"$SC 16^13\r"),
        (("SC", 32, "V"), {}, b"$SC 32 V^63\r"),
        (("GS",), {"seq": 1}, b"$GS :01^2B\r"),
        (("SY",), {}, b"$SY^2E\r"),
        (("GS",), {"checksum": "none"}, b"$GS\r"),
    ],
)
def test_encode_command(
    args: tuple[str | int, ...], kwargs: dict[str, object], frame: bytes
) -> None:
    assert encode_command(*args, **kwargs) == frame  # type: ignore[arg-type]


def test_encode_command_puts_the_sequence_id_before_the_checksum() -> None:
    frame = encode_command("SC", 16, "V", seq=5)
    body = b"$SC 16 V :05"
    assert frame == body + b"^%02X\r" % checksum_xor(body)


@pytest.mark.parametrize("seq", [0, 256, -1])
def test_encode_command_rejects_reserved_or_out_of_range_sequence_ids(seq: int) -> None:
    with pytest.raises(ValueError, match="sequence"):
        encode_command("GS", seq=seq)


@pytest.mark.parametrize("arg", ["1 2", "", "a^b", "x*", ":05", "$", "\r"])
def test_encode_command_rejects_arguments_that_would_break_the_frame(arg: str) -> None:
    with pytest.raises(ValueError, match="argument"):
        encode_command("SC", arg)


def test_encode_command_rejects_bad_command_names() -> None:
    with pytest.raises(ValueError, match="command"):
        encode_command("gs")
    with pytest.raises(ValueError, match="command"):
        encode_command("GSX")


# --------------------------------------------------------------------------- parsing


def test_parse_reply_with_tokens_and_sequence_id() -> None:
    frame = parse_frame(encode_command("OK", "03", 42, "03", "0140", seq=0xA7))
    assert frame == RapiFrame("OK", ("03", "42", "03", "0140"), 0xA7, "xor")
    assert frame.is_reply
    assert not frame.is_async


@pytest.mark.parametrize("seq", range(1, 256))
def test_every_sequence_id_round_trips(seq: int) -> None:
    assert parse_frame(encode_command("GS", seq=seq)).seq == seq


def test_lower_case_hex_is_accepted_in_checksum_and_sequence_id() -> None:
    body = b"$OK :ab"
    frame = parse_frame(body + b"^%02x\r" % checksum_xor(body))
    assert frame.seq == 0xAB


def test_parse_async_frames() -> None:
    at = parse_frame(encode_command("AT", "03", "03", 16, "0140"))
    assert at.kind == "AT"
    assert at.is_async
    assert at.seq is None
    assert parse_frame(encode_command("WF", "02")).is_async


def test_legacy_and_missing_checksums_are_accepted_unless_required() -> None:
    assert parse_frame(b"$FE*AF\r") == RapiFrame("FE", (), None, "sum")
    assert parse_frame(b"$GS\r") == RapiFrame("GS", (), None, "none")
    with pytest.raises(ProtocolError, match="without checksum"):
        parse_frame(b"$GS\r", require_checksum=True)


@pytest.mark.parametrize(
    "line",
    [
        b"$GS^31\r",  # wrong XOR
        b"$FE*AE\r",  # wrong sum
        b"$OK 01 0 01 0100 :05^00\r",
    ],
)
def test_bad_checksum_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad RAPI checksum"):
        parse_frame(line)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"$GS^3\r", "malformed RAPI checksum"),  # truncated checksum
        (b"$GS^ZZ\r", "malformed RAPI checksum"),
        (b"$GS^300\r", "malformed RAPI checksum"),
        (b"GS^30\r", "does not start"),
        (b"", "does not start"),
        (b"$G\r", "bad RAPI command"),
        (b"$\r", "empty token"),
        (b"$gs\r", "bad RAPI command"),
        (b"$GS  1\r", "empty token"),
        (b"$OK $GS\r", "second"),
        (b"$OK \xff\r", "not ASCII"),
        (b"$OK \x01\r", "control characters"),
        (b"$OK :0\r", "sequence id"),
        (b"$OK :XY\r", "sequence id"),
        (b"$OK :00\r", "reserved"),
        (b"$AT 1 2 3 4 5 6 7 8 9 10\r", "too many tokens"),
    ],
)
def test_garbage_frames_are_protocol_errors(line: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_frame(line)


def test_truncated_reply_fails_when_a_checksum_is_required() -> None:
    with pytest.raises(ProtocolError):
        parse_frame(b"$OK 01 0 01", require_checksum=True)


@given(
    kind=st.sampled_from(["OK", "NK", "AT", "GS", "SC", "S1", "G0"]),
    args=st.lists(
        st.one_of(
            st.integers(min_value=-100_000, max_value=10**9),
            st.text(alphabet="0123456789abcdefABCDEFVM.-", min_size=1, max_size=6),
        ),
        max_size=5,
    ),
    seq=st.one_of(st.none(), st.integers(min_value=1, max_value=255)),
    checksum=st.sampled_from(["xor", "sum", "none"]),
)
def test_encode_then_parse_round_trips(
    kind: str, args: list[str | int], seq: int | None, checksum: str
) -> None:
    frame = parse_frame(encode_command(kind, *args, seq=seq, checksum=checksum))  # type: ignore[arg-type]
    assert frame == RapiFrame(kind, tuple(str(a) for a in args), seq, checksum)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- framer

OK_GS = encode_command("OK", "03", 12, "03", "0140", seq=5)
AT_C = encode_command("AT", "03", "03", 16, "0140")


def test_framer_returns_frames_split_across_reads() -> None:
    framer = RapiFramer(require_checksum=True)
    frames: list[RapiFrame] = []
    for i in range(len(OK_GS + AT_C)):
        frames += framer.feed((OK_GS + AT_C)[i : i + 1])
    assert [f.kind for f in frames] == ["OK", "AT"]
    assert frames[0].seq == 5
    assert framer.dropped == 0


def test_framer_skips_garbage_between_frames_and_counts_it() -> None:
    framer = RapiFramer(require_checksum=True)
    frames = framer.feed(b"\x00\xffnoise" + OK_GS + b"\n\r junk" + AT_C)
    assert [f.kind for f in frames] == ["OK", "AT"]
    assert framer.garbage_bytes == len(b"\x00\xffnoise") + len(b" junk")
    assert framer.dropped == 0


def test_dollar_mid_frame_restarts_the_frame() -> None:
    framer = RapiFramer(require_checksum=True)
    frames = framer.feed(b"$OK 03 1" + AT_C)
    assert frames == [RapiFrame("AT", ("03", "03", "16", "0140"), None, "xor")]
    assert framer.dropped == 1


def test_truncated_frame_followed_by_cr_is_dropped() -> None:
    framer = RapiFramer(require_checksum=True)
    assert framer.feed(b"$OK 03 12 03\r") == []
    assert framer.dropped == 1
    assert [f.kind for f in framer.feed(OK_GS)] == ["OK"]


def test_frame_with_bad_checksum_is_dropped_and_the_next_one_parses() -> None:
    framer = RapiFramer(require_checksum=True)
    corrupted = OK_GS.replace(b"12", b"13")
    assert [f.kind for f in framer.feed(corrupted + AT_C)] == ["AT"]
    assert framer.dropped == 1


def test_over_long_frame_is_dropped_whole() -> None:
    framer = RapiFramer(max_len=64)
    frames = framer.feed(b"$OK " + b"1" * 100 + b"\r" + AT_C)
    assert [f.kind for f in frames] == ["AT"]
    assert framer.dropped == 1


def test_frame_of_exactly_max_len_is_kept() -> None:
    framer = RapiFramer(max_len=31)
    body = b"$OK " + b"1" * 27
    assert len(body) == 31
    assert framer.feed_raw(body + b"\r") == [body]
    assert framer.feed_raw(body + b"1\r") == []
    assert framer.dropped == 1


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_framer_output_does_not_depend_on_how_reads_are_split(cuts: list[int]) -> None:
    stream = b"zz" + OK_GS + b"$OK 1" + AT_C + b"\x00" + OK_GS + AT_C
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    framer = RapiFramer(require_checksum=True)
    frames = [f for chunk in chunks for f in framer.feed(chunk)]
    assert [f.kind for f in frames] == ["OK", "AT", "OK", "AT"]
    assert framer.dropped == 1


# --------------------------------------------------------------------------- state mapping

FAULTS = {
    0x04: FaultCode.VENT_REQUIRED,
    0x05: FaultCode.DIODE_CHECK,
    0x06: FaultCode.GROUND_FAULT,
    0x07: FaultCode.NO_GROUND,
    0x08: FaultCode.STUCK_RELAY,
    0x09: FaultCode.GFI_SELF_TEST,
    0x0A: FaultCode.OVER_TEMPERATURE,
    0x0B: FaultCode.OVER_CURRENT,
    0x0C: FaultCode.PILOT,
    0x0D: FaultCode.TEMPERATURE_SENSOR,
    0x0E: FaultCode.RELAY_CLOSURE,
}

# (evsestate, pilotstate, vflags) -> (vehicle, mode, fault, contactor)
MAPPING = [
    (0x00, 0x00, 0x0000, VehicleState.UNKNOWN, ControlMode.ENABLED, None, False),
    (0x01, 0x01, 0x0000, VehicleState.ABSENT, ControlMode.ENABLED, None, False),
    (0x02, 0x02, 0x0100, VehicleState.CONNECTED, ControlMode.ENABLED, None, False),
    (0x03, 0x03, 0x0100, VehicleState.REQUESTING, ControlMode.ENABLED, None, False),
    (0x03, 0x03, 0x0140, VehicleState.CHARGING, ControlMode.ENABLED, None, True),
    *[
        (code, 0x02, 0x0100, VehicleState.FAULT, ControlMode.ENABLED, fault, False)
        for code, fault in FAULTS.items()
    ],
    (0xFE, 0x01, 0x0000, VehicleState.ABSENT, ControlMode.PAUSED, None, False),
    (0xFE, 0x02, 0x0100, VehicleState.CONNECTED, ControlMode.PAUSED, None, False),
    (0xFE, 0x02, 0x0000, VehicleState.CONNECTED, ControlMode.PAUSED, None, False),
    (0xFE, 0x01, 0x0100, VehicleState.CONNECTED, ControlMode.PAUSED, None, False),
    (0xFE, 0x03, 0x0140, VehicleState.CONNECTED, ControlMode.PAUSED, None, True),
    (0xFF, 0x01, 0x0000, VehicleState.ABSENT, ControlMode.DISABLED, None, False),
    (0xFF, 0x01, 0x0100, VehicleState.CONNECTED, ControlMode.DISABLED, None, False),
    (0x0F, 0x02, 0x0100, VehicleState.FAULT, ControlMode.ENABLED, FaultCode.OTHER, False),
    (0x10, 0x01, 0x0000, VehicleState.FAULT, ControlMode.ENABLED, FaultCode.OTHER, False),
    (0xFD, 0x01, 0x0000, VehicleState.FAULT, ControlMode.ENABLED, FaultCode.OTHER, False),
]


@pytest.mark.parametrize(
    ("evsestate", "pilot", "vflags", "vehicle", "mode", "fault", "contactor"),
    MAPPING,
    ids=[f"{m[0]:02X}-{m[1]:02X}-{m[2]:04X}" for m in MAPPING],
)
def test_state_mapping(
    evsestate: int,
    pilot: int,
    vflags: int,
    vehicle: VehicleState,
    mode: ControlMode,
    fault: FaultCode | None,
    contactor: bool,
) -> None:
    status = status_from_state(evsestate, pilot, vflags, 16)
    assert status.vehicle is vehicle
    assert status.mode is mode
    assert status.fault is fault
    assert status.contactor_closed is contactor
    assert status.offered_current_a == 16.0
    assert status.vendor_code == f"{evsestate:02X}"


@pytest.mark.parametrize("evsestate", range(256), ids=lambda c: f"{c:02X}")
def test_every_state_code_gives_a_consistent_status(evsestate: int) -> None:
    status = status_from_state(evsestate, 0x02, EV_CONNECTED | FLAG_CHARGING_ON, 6)
    assert (status.fault is not None) == (status.vehicle is VehicleState.FAULT)
    assert status.vendor_code == f"{evsestate:02X}"
    if evsestate in FAULTS:
        assert status.fault is FAULTS[evsestate]
    elif evsestate in (0x00, 0x01, 0x02, 0x03, 0xFE, 0xFF):
        assert status.fault is None
    else:
        assert status.fault is FaultCode.OTHER
    assert status.contactor_closed


def test_ground_fault_vendor_code_is_06() -> None:
    status = status_from_state(0x06, 0x03, 0x0180, 32)
    assert (status.vehicle, status.fault, status.vendor_code) == (
        VehicleState.FAULT,
        FaultCode.GROUND_FAULT,
        "06",
    )
