"""Bad input never takes the charger down.

From the CSMS: frames that are not JSON, not OCPP-J, CALLs with a bad id, action or
payload, results nobody asked for, binary frames. Each one is answered (CALLERROR with the
same id) or dropped, and the connection, the OCPP session and a charging session in
progress carry on: a well-formed GetConfiguration sent right after every bad frame is
answered, the agent does not reconnect, and MeterValues keep coming.

From the local control socket and the simulator control: bad requests get
``{"ok": false, "error": ...}`` and the agent keeps running.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ocpp.v16 import call

from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, OCPP16_ERROR_CODES, AgentFactory, RunningAgent, status_is

PAYLOAD_ERRORS = {
    "FormationViolation",
    "PropertyConstraintViolation",
    "OccurenceConstraintViolation",
    "TypeConstraintViolation",
}


@dataclass
class Wire:
    """Every frame the agent sent to the CSMS, as text, recorded in the CSMS's router."""

    raw: list[str | bytes] = field(default_factory=list)

    def parsed(self, since: int = 0) -> Iterator[Any]:
        for text in self.raw[since:]:
            yield json.loads(text)

    def answers(self, unique_id: object, since: int = 0) -> list[list[Any]]:
        """The agent's CALLRESULTs and CALLERRORs carrying ``unique_id``."""
        return [
            f
            for f in self.parsed(since)
            if isinstance(f, list) and len(f) > 1 and f[0] in (3, 4) and f[1] == unique_id
        ]

    def all_answers(self, since: int = 0) -> list[list[Any]]:
        return [f for f in self.parsed(since) if isinstance(f, list) and f and f[0] in (3, 4)]

    async def answer(self, unique_id: str, timeout_s: float = 10.0) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (found := self.answers(unique_id)):
            if loop.time() > deadline:
                raise AssertionError(f"the agent never answered message {unique_id}")
            await asyncio.sleep(0.01)
        return found[0]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Record the raw frames the agent sends (the CSMS's ``route_message`` sees each one)."""
    recorder = Wire()
    original = csms_module._CsmsChargePoint.route_message

    async def route_message(self: Any, raw_msg: str) -> None:
        recorder.raw.append(raw_msg)
        await original(self, raw_msg)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "route_message", route_message)
    return recorder


class Prober:
    """Sends a well-formed GetConfiguration and checks the agent answers it properly."""

    def __init__(self, csms: Csms, wire: Wire) -> None:
        self.csms = csms
        self.wire = wire
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1
        uid = f"probe-{self.count}"
        frame = [2, uid, "GetConfiguration", {"key": ["HeartbeatInterval"]}]
        await self.csms.call_raw(CP_ID, json.dumps(frame))
        answer = await self.wire.answer(uid)
        assert answer[0] == 3, answer
        assert answer[2]["configurationKey"][0]["key"] == "HeartbeatInterval"


@pytest.fixture
def probe(csms: Csms, wire: Wire) -> Prober:
    return Prober(csms, wire)


async def send_binary(csms: Csms, data: bytes) -> None:
    await csms.wait_connected(CP_ID)
    await csms._cps[CP_ID]._connection.send(data)


# (name, frame text, id of the answer, acceptable error codes); codes None: dropped.
BAD_FRAMES: list[tuple[str, str, object, set[str] | None]] = [
    ("not-json", "this is {not JSON", None, None),
    ("truncated-json", '[2, "t-1", "GetConfiguration", {', None, None),
    ("json-object", '{"messageTypeId": 2, "uniqueId": "o-1"}', None, None),
    ("json-string", '"[2, \\"s-1\\", \\"Reset\\", {}]"', None, None),
    ("json-null", "null", None, None),
    ("empty-list", "[]", None, None),
    ("unknown-type", '[7, "u-1", "Reset", {"type": "Hard"}]', "u-1", None),
    ("int-id", '[2, 42, "GetConfiguration", {}]', 42, None),
    ("null-id", '[2, null, "GetConfiguration", {}]', None, None),
    ("empty-id", '[2, "", "GetConfiguration", {}]', "", None),
    ("long-id", json.dumps([2, "x" * 37, "GetConfiguration", {}]), "x" * 37, None),
    ("missing-payload", '[2, "m-1", "GetConfiguration"]', "m-1", {"FormationViolation"}),
    ("list-payload", '[2, "m-2", "GetConfiguration", []]', "m-2", {"FormationViolation"}),
    ("int-action", '[2, "m-3", 17, {}]', "m-3", {"FormationViolation"}),
    ("extra-element", '[2, "m-4", "GetConfiguration", {}, 1]', "m-4", {"FormationViolation"}),
    ("unknown-action", '[2, "a-1", "FooBar", {}]', "a-1", {"NotImplemented"}),
    (
        "unhandled-action",
        '[2, "a-2", "Heartbeat", {}]',  # an action the CSMS never sends a charger
        "a-2",
        {"NotSupported"},  # OCPP-J 1.6 Table 7: known, but not supported by the receiver
    ),
    (
        "wrong-type",
        '[2, "p-1", "ChangeAvailability", {"connectorId": "x", "type": "Operative"}]',
        "p-1",
        {"TypeConstraintViolation"},
    ),
    (
        "bad-enum",
        '[2, "p-2", "ChangeAvailability", {"connectorId": 1, "type": "Sideways"}]',
        "p-2",
        PAYLOAD_ERRORS,
    ),
    (
        "missing-field",
        '[2, "p-3", "ChangeAvailability", {"connectorId": 1}]',
        "p-3",
        PAYLOAD_ERRORS | {"ProtocolError"},
    ),
    (
        "extra-field",
        '[2, "p-4", "Reset", {"type": "Soft", "when": "now"}]',
        "p-4",
        {"FormationViolation"},
    ),
    (
        "too-long-string",
        json.dumps([2, "p-5", "ChangeConfiguration", {"key": "K" * 51, "value": "1"}]),
        "p-5",
        PAYLOAD_ERRORS,
    ),
    ("unknown-result", '[3, "nobody-asked-1", {"status": "Accepted"}]', "nobody-asked-1", None),
    ("unknown-error", '[4, "nobody-asked-2", "GenericError", "", {}]', "nobody-asked-2", None),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, None, None),
    (
        "deep-payload",
        json.dumps([2, "d-1", "DataTransfer", {"vendorId": "v", "data": "x"}]).replace(
            '"x"', "[" * 200 + "]" * 200
        ),
        "d-1",
        PAYLOAD_ERRORS,
    ),
    (
        "deep-object",
        json.dumps([2, "d-2", "GetConfiguration", {"key": "x"}]).replace(
            '"x"', '{"a": ' * 500 + "1" + "}" * 500
        ),
        "d-2",
        PAYLOAD_ERRORS,
    ),
]


@pytest.mark.parametrize(
    ("frame", "answer_id", "codes"),
    [pytest.param(text, uid, codes, id=name) for name, text, uid, codes in BAD_FRAMES],
)
async def test_bad_frame_is_answered_or_dropped(
    booted: RunningAgent,
    csms: Csms,
    wire: Wire,
    probe: Prober,
    frame: str,
    answer_id: object,
    codes: set[str] | None,
) -> None:
    await probe()
    mark = len(wire.raw)
    await csms.call_raw(CP_ID, frame)
    await probe()  # answered in order: any answer to the bad frame came before this one
    answers = [a for a in wire.all_answers(mark) if not str(a[1]).startswith("probe-")]
    if codes is None:
        assert answers == [], "the frame should have been dropped"
    else:
        assert len(answers) == 1, answers
        answer = answers[0]
        assert answer[:2] == [4, answer_id]
        assert answer[2] in codes, answer
        assert len(answer) == 5
        assert isinstance(answer[3], str)
        assert isinstance(answer[4], dict)
    assert booted.task is not None
    assert not booted.task.done()
    assert csms.connections == 1, "the agent reconnected"
    assert csms.errors == []


async def test_binary_frame_is_dropped(
    booted: RunningAgent, csms: Csms, wire: Wire, probe: Prober, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcp")
    await probe()
    mark = len(wire.raw)
    await send_binary(csms, json.dumps([2, "b-1", "GetConfiguration", {}]).encode())
    await send_binary(csms, b"\x00\xff\xfe garbage")
    await probe()
    assert [a for a in wire.all_answers(mark) if a[1] == "b-1"] == []
    assert "binary" in caplog.text
    assert csms.connections == 1
    assert not booted.task.done()  # type: ignore[union-attr]


async def test_result_for_unknown_id_is_logged_once(
    booted: RunningAgent, csms: Csms, probe: Prober, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcp")
    await csms.call_raw(CP_ID, '[3, "never-sent-1", {}]')
    await csms.call_raw(CP_ID, '[4, "never-sent-2", "InternalError", "oops", {}]')
    await probe()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("evcp")]
    assert sum("never-sent-1" in line for line in lines) == 1, lines
    assert sum("never-sent-2" in line for line in lines) == 1, lines
    assert all(r.exc_info is None for r in caplog.records if "never-sent" in r.getMessage())
    assert csms.connections == 1


async def test_session_carries_on_through_bad_frames(
    booted: RunningAgent, csms: Csms, wire: Wire, probe: Prober
) -> None:
    """A charging session in progress survives every bad frame at once."""
    await booted.swipe("TAG-ROBUST")
    await booted.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    status = await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    tx_id = status["connectors"][0]["transaction_id"]
    for _name, frame, _uid, _codes in BAD_FRAMES:
        await csms.call_raw(CP_ID, frame)
        await probe()
    await send_binary(csms, b"\x01\x02\x03")
    await probe()
    mark = len(csms.received)

    def of_tx(payload: dict[str, Any]) -> bool:
        return bool(payload.get("transactionId") == tx_id)

    mv = await csms.wait_message("MeterValues", of_tx, after=mark)
    assert mv.payload["meterValue"]
    later = await csms.wait_message("MeterValues", of_tx, after=csms.received.index(mv) + 1)
    assert later.payload["meterValue"][0]["timestamp"] >= mv.payload["meterValue"][0]["timestamp"]
    status = await booted.status()
    assert status["connectors"][0]["status"] == "Charging"
    assert status["connectors"][0]["transaction_id"] == tx_id
    assert status["csms"]["connected"] is True
    assert csms.connections == 1
    assert csms.messages("StopTransaction") == []
    assert csms.errors == []
    for answer in wire.all_answers():
        if answer[0] == 4:
            assert answer[2] in OCPP16_ERROR_CODES, answer


async def test_rejected_authorization_key_is_not_used(booted: RunningAgent, csms: Csms) -> None:
    """A ChangeConfiguration the agent rejects changes nothing, not even the password."""
    result = await csms.call(CP_ID, call.ChangeConfiguration(key="AuthorizationKey", value="short"))
    assert result["status"] == "Rejected"
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="WebSocketPingInterval", value="-5")
    )
    assert result["status"] == "Rejected"
    await csms.call(CP_ID, call.GetConfiguration(key=["HeartbeatInterval"]))
    assert csms.connections == 1, "the agent reconnected after a rejected change"
    # Reconnecting still works with the password the CSMS knows.
    await csms.disconnect(CP_ID)
    await csms.wait_for(lambda: csms.connections == 2 and csms.connected(CP_ID))
    await csms.call(CP_ID, call.GetConfiguration(key=["HeartbeatInterval"]))
    assert csms.auth_failures == 0
    assert csms.errors == []


# ---------------------------------------------------------------------- control socket


async def control_lines(agent: RunningAgent, *lines: bytes) -> list[Any]:
    """Send raw lines on one control connection; return the answers (None: no answer)."""
    reader, writer = await asyncio.open_unix_connection(str(agent.socket), limit=1 << 20)
    answers: list[Any] = []
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 10)
            answers.append(json.loads(reply) if reply else None)
    finally:
        writer.close()
    return answers


def assert_refused(answer: Any, *words: str) -> None:
    assert isinstance(answer, dict), answer
    assert answer["ok"] is False, answer
    assert isinstance(answer["error"], str), answer
    assert answer["error"], answer
    for word in words:
        assert word in answer["error"], answer


async def test_control_socket_bad_requests(booted: RunningAgent) -> None:
    answers = await control_lines(
        booted,
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"no": "cmd"}\n',
        b'{"cmd": 5}\n',
        b'{"cmd": "launch-rockets"}\n',
        b'{"cmd": "swipe", "tag": "' + b"T" * 30 + b'"}\n',
        b'{"cmd": "swipe", "tag": ""}\n',
        b'{"cmd": "swipe"}\n',
        b'{"cmd": "swipe", "tag": "TAG", "connector": 9}\n',
        b'{"cmd": "swipe", "tag": "TAG", "connector": "1"}\n',
        b'{"cmd": "status"}\n',  # the same connection still works
    )
    assert_refused(answers[0], "JSON")
    for answer in answers[1:4]:
        assert_refused(answer, "cmd")
    assert_refused(answers[4], "launch-rockets")
    for answer in answers[5:8]:
        assert_refused(answer, "idTag")
    for answer in answers[8:10]:
        assert_refused(answer, "connector")
    assert answers[10]["ok"] is True
    status = await booted.status()
    assert status["ok"] is True
    assert status["connectors"][0]["status"] == "Available"
    assert status["connectors"][0]["transaction_id"] is None
    assert not booted.task.done()  # type: ignore[union-attr]


async def test_control_socket_oversized_request(booted: RunningAgent) -> None:
    """A request line over the limit is refused or the connection closed; nothing else."""
    answers = await control_lines(booted, b'{"cmd": "status", "pad": "' + b"x" * 200_000 + b'"}\n')
    assert answers[0] is None or answers[0]["ok"] is False
    assert (await booted.status())["ok"] is True
    assert not booted.task.done()  # type: ignore[union-attr]


async def test_control_socket_client_hangs_up(booted: RunningAgent) -> None:
    """A client that goes away mid-request does not disturb the agent."""
    for partial in (b"", b'{"cmd": "sta', b'{"cmd": "status"}'):
        _reader, writer = await asyncio.open_unix_connection(str(booted.socket))
        writer.write(partial)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    assert (await booted.status())["ok"] is True
    assert not booted.task.done()  # type: ignore[union-attr]


async def test_simulator_bad_requests(booted: RunningAgent, csms: Csms) -> None:
    async def sim(request: Any) -> dict[str, Any]:
        return await booted.control({"cmd": "sim", "request": request})

    assert_refused(await sim({"cmd": "fault", "connector": 1, "code": "Meltdown"}), "Meltdown")
    assert_refused(await sim({"cmd": "fault", "connector": 1}), "fault")
    assert_refused(await sim({"cmd": "plug", "connector": 9}), "9")
    assert_refused(await sim({"cmd": "plug", "connector": "1"}), "connector")
    assert_refused(await sim({"cmd": "levitate", "connector": 1}), "levitate")
    assert_refused(await sim({"connector": 1}))
    assert_refused(await sim({"cmd": "ev-max-current", "connector": 1, "current_a": "lots"}))
    assert_refused(await sim({"cmd": "ev-max-current", "connector": 1, "current_a": 500}))
    assert_refused(await sim("plug"))
    assert_refused(await sim(None))
    # Nothing was plugged or faulted by any of that; the simulator still obeys.
    status = await booted.status()
    assert status["connectors"][0]["status"] == "Available"
    assert status["connectors"][0]["error_code"] == "NoError"
    state = await booted.sim("state")
    assert state["connectors"][0]["plugged"] is False
    assert state["connectors"][0]["fault"] is None
    mark = len(csms.received)
    await booted.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"), after=mark)
    assert not booted.task.done()  # type: ignore[union-attr]
    assert csms.errors == []


async def test_callerror_with_an_unknown_code_is_a_refusal_not_a_crash(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSMS answering StartTransaction with an error code OCPP 1.6 does not define (here
    2.0.1's RpcFrameworkError) once: the agent keeps running, retries, and the transaction
    is delivered (the library raises a non-OCPPError for unknown codes)."""
    original = csms_module._CsmsChargePoint._send
    state: dict[str, Any] = {"armed": True, "last": None}
    csms.listener = lambda item: state.__setitem__("last", item.action)

    async def send(self: Any, message: str) -> None:
        if state["armed"] and state["last"] == "StartTransaction" and message.startswith("[3,"):
            state["armed"] = False
            unique_id = json.loads(message)[1]
            await self._connection.send(json.dumps([4, unique_id, "RpcFrameworkError", "x", {}]))
            return
        await original(self, message)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    booted = await make_agent(ocpp={"TransactionMessageRetryInterval": 1})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)  # online
    await booted.sim("plug")
    assert "started" in await booted.swipe("TAG-1")
    await csms.wait_for(lambda: len(csms.messages("StartTransaction")) >= 2, timeout_s=30)
    assert not state["armed"]
    assert booted.task is not None and not booted.task.done()
    await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)


@pytest.mark.parametrize(
    ("action", "field", "value"),
    [
        ("StartTransaction", "vendorNote", "not in OCPP 1.6"),
        ("StartTransaction", "idTagInfo", "Accepted"),  # not an object
        ("MeterValues", "vendorNote", "not in OCPP 1.6"),
        ("StopTransaction", "vendorNote", "not in OCPP 1.6"),
    ],
)
async def test_a_malformed_answer_to_a_transaction_message_counts_as_delivered(
    make_agent: AgentFactory,
    csms: Csms,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    field: str,
    value: Any,
) -> None:
    """The CSMS answers one transaction message with a CALLRESULT that breaks the schema.
    A CALLRESULT means the CSMS has the message, so sending it again would only make a
    duplicate: every message arrives exactly once, the transactionId is still read from
    the answer, an unreadable idTagInfo does not stop the charging, nothing is left failed."""
    original = csms_module._CsmsChargePoint._send
    state: dict[str, Any] = {"armed": True, "last": None}
    csms.listener = lambda item: state.__setitem__("last", item.action)

    async def send(self: Any, message: str) -> None:
        if state["armed"] and state["last"] == action and message.startswith("[3,"):
            state["armed"] = False
            frame = json.loads(message)
            frame[2][field] = value
            message = json.dumps(frame)
        await original(self, message)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    agent = await make_agent(
        ocpp={"TransactionMessageRetryInterval": 1, "MeterValueSampleInterval": 1}
    )
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)  # online
    await agent.sim("plug")
    assert "started" in await agent.swipe("TAG-1")
    await csms.wait_for(lambda: len(csms.messages("MeterValues")) >= 3, timeout_s=30)
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Charging")
    assert "stopped" in await agent.swipe("TAG-1")
    await csms.wait_message("StopTransaction")
    status = await agent.wait_status(lambda s: s["queue"]["pending"] == 0)
    await asyncio.sleep(1.5)  # a resend would come after TransactionMessageRetryInterval

    assert not state["armed"]
    assert status["queue"]["failed"] == 0
    assert len(csms.messages("StartTransaction")) == 1
    assert len(csms.messages("StopTransaction")) == 1
    meter_values = csms.messages("MeterValues")
    taken = [json.dumps(m["meterValue"], sort_keys=True) for m in meter_values]
    assert len(set(taken)) == len(taken), "a MeterValues was sent twice"
    assert {m["transactionId"] for m in meter_values} == {1001}
    assert csms.messages("StopTransaction")[0]["transactionId"] == 1001
