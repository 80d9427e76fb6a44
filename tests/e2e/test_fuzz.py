"""Property-based fuzzing of the agent's OCPP-J receive path, end to end.

Design: the test is an ``async def`` decorated with hypothesis' ``@given``. pytest-asyncio
runs such a test as an ``AsyncHypothesisTest``: the fixtures (the CSMS, the agent on the
simulated hardware) are set up once per test on the test's event loop, and hypothesis then
runs every example to completion on that same loop, one after the other. So one agent,
booted once, receives every example, and no second loop or thread is needed (the
per-example ``asyncio.run`` that makes fuzzing a live service slow or impossible never
happens). Between examples the loop is briefly idle while hypothesis generates data; the
agent does not mind. Because the agent is stateful, a failing example need not fail again
when replayed, and a dead agent would make every replay wait for a timeout: so there is no
shrinking phase, and the assertion messages print the whole batch (and, when the agent
died, the batch before).

Each example is a batch of frames sent by the CSMS: arbitrary text, arbitrary JSON, binary
frames, arrays shaped like OCPP-J CALLs (actions from the OCPP 1.6 list or random, payload
dicts with real field names or random keys, good and bad unique ids), schema-valid
requests with odd values for every action the agent handles, malformed CALLs, frames nested
thousands of levels deep, and CALLRESULT/CALLERRORs for ids the agent never used. After the batch, a well-formed
GetConfiguration is sent; the agent handles frames in order, so once its answer is back,
every answer to the batch has arrived too. Then:

- the agent is alive (its task has not ended) and did not reconnect;
- every CALL-shaped frame with a valid unique id got exactly one answer with that id (a
  well-formed one a CALLRESULT or CALLERROR, a malformed one a FormationViolation), and
  nothing else was answered;
- every CALLERROR uses an OCPP 1.6 error code, and none is an InternalError (no handler
  crashed on input that passed the schema);
- the CSMS never had to answer one of the agent's own CALLs with a CALLERROR
  (``csms.errors`` stays empty: the agent never sent an invalid message).

``Reset`` is left out of the actions, and AuthorizationKey and WebSocketPingInterval out of
the ChangeConfiguration keys: they are not bad input, and they restart or reconnect the
agent by design.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ocpp.v16.enums import Action

from agent.features.registry import SPECS
from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, OCPP16_ERROR_CODES, RunningAgent

ACTIONS = sorted(a.value for a in Action if a is not Action.reset)
FIELDS = [
    "connectorId", "type", "key", "value", "idTag", "transactionId", "requestedMessage",
    "vendorId", "messageId", "data", "duration", "chargingRateUnit", "csChargingProfiles",
    "chargingProfile", "id", "stackLevel", "chargingProfilePurpose", "location",
    "retrieveDate", "reservationId", "expiryDate", "listVersion", "updateType",
]  # fmt: skip
WORDS = [
    "Operative", "Inoperative", "Accepted", "StatusNotification", "MeterValues", "Heartbeat",
    "BootNotification", "A", "W", "TxProfile", "TxDefaultProfile", "ChargePointMaxProfile",
    "HeartbeatInterval", "MeterValueSampleInterval", "",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(WORDS)
    | st.integers(min_value=-1, max_value=3)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
good_ids = st.text(min_size=1, max_size=36).filter(lambda s: not s.startswith("probe"))
bad_ids = (
    st.just("")
    | st.text(min_size=37, max_size=45)
    | st.integers()
    | st.none()
    | st.lists(st.integers(), max_size=2)
)
surrogate_text = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
payloads = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=12),
    json_values | surrogate_text,
    max_size=5,
)
actions = st.sampled_from(ACTIONS) | st.text(max_size=25) | surrogate_text


def dumps(value: Any) -> str:
    return json.dumps(value)


calls = st.builds(lambda i, a, p: dumps([2, i, a, p]), good_ids, actions, payloads)
calls_bad_id = st.builds(lambda i, a, p: dumps([2, i, a, p]), bad_ids, actions, payloads)
malformed_calls = st.builds(
    lambda i, rest: dumps([2, i, *rest]), good_ids | bad_ids, st.lists(json_values, max_size=5)
)
results = st.builds(lambda i, p: dumps([3, i, p]), good_ids | bad_ids, json_values)
errors = st.builds(
    lambda i, code, text, details: dumps([4, i, code, text, details]),
    good_ids | bad_ids,
    st.sampled_from(sorted(OCPP16_ERROR_CODES)) | st.text(max_size=20),
    st.text(max_size=30),
    json_values,
)
# Schema-valid requests for the actions the agent handles, with odd but legal values, so
# the handlers themselves are exercised (the random payloads above rarely pass the schema).
# AuthorizationKey and WebSocketPingInterval are left out: accepting a new value makes the
# agent reconnect, by design.
config_keys = sorted(set(SPECS) - {"AuthorizationKey", "WebSocketPingInterval"})
connector_ids = st.integers(min_value=-1, max_value=3)
small_ints = st.integers(min_value=-5, max_value=100_000)
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda t: t.isoformat() + "Z"
)
limits = st.integers(min_value=0, max_value=1000).map(lambda n: n / 10)
schedules = st.fixed_dictionaries(
    {
        "chargingRateUnit": st.sampled_from(["A", "W"]),
        "chargingSchedulePeriod": st.lists(
            st.fixed_dictionaries(
                {"startPeriod": small_ints, "limit": limits},
                optional={"numberPhases": st.integers(min_value=0, max_value=4)},
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"duration": small_ints, "startSchedule": times, "minChargingRate": limits},
)
profiles = st.fixed_dictionaries(
    {
        "chargingProfileId": small_ints,
        "stackLevel": st.integers(min_value=-1, max_value=12),
        "chargingProfilePurpose": st.sampled_from(
            ["ChargePointMaxProfile", "TxDefaultProfile", "TxProfile"]
        ),
        "chargingProfileKind": st.sampled_from(["Absolute", "Recurring", "Relative"]),
        "chargingSchedule": schedules,
    },
    optional={
        "transactionId": small_ints,
        "recurrencyKind": st.sampled_from(["Daily", "Weekly"]),
        "validFrom": times,
        "validTo": times,
    },
)
id_tags = st.text(min_size=1, max_size=20)
trigger_messages = st.sampled_from(
    ["BootNotification", "DiagnosticsStatusNotification", "FirmwareStatusNotification",
     "Heartbeat", "MeterValues", "StatusNotification"]
)  # fmt: skip
valid_requests = st.one_of(
    st.tuples(
        st.just("ChangeAvailability"),
        st.fixed_dictionaries(
            {"connectorId": connector_ids, "type": st.sampled_from(["Operative", "Inoperative"])}
        ),
    ),
    st.tuples(
        st.just("ChangeConfiguration"),
        st.fixed_dictionaries(
            {
                "key": st.sampled_from(config_keys) | st.text(max_size=50),
                "value": st.text(max_size=20) | small_ints.map(str) | st.sampled_from(WORDS),
            }
        ),
    ),
    st.tuples(st.just("ClearCache"), st.just({})),
    st.tuples(
        st.just("DataTransfer"),
        st.fixed_dictionaries(
            {"vendorId": st.text(max_size=255)},
            optional={"messageId": st.text(max_size=50), "data": st.text(max_size=50)},
        ),
    ),
    st.tuples(
        st.just("GetConfiguration"),
        st.fixed_dictionaries(
            {},
            optional={
                "key": st.lists(st.sampled_from(config_keys) | st.text(max_size=50), max_size=5)
            },
        ),
    ),
    st.tuples(
        st.just("RemoteStartTransaction"),
        st.fixed_dictionaries(
            {"idTag": id_tags},
            optional={"connectorId": connector_ids, "chargingProfile": profiles},
        ),
    ),
    st.tuples(
        st.just("RemoteStopTransaction"), st.fixed_dictionaries({"transactionId": small_ints})
    ),
    st.tuples(st.just("UnlockConnector"), st.fixed_dictionaries({"connectorId": connector_ids})),
    st.tuples(
        st.just("SetChargingProfile"),
        st.fixed_dictionaries({"connectorId": connector_ids, "csChargingProfiles": profiles}),
    ),
    st.tuples(
        st.just("ClearChargingProfile"),
        st.fixed_dictionaries(
            {},
            optional={
                "id": small_ints,
                "connectorId": connector_ids,
                "chargingProfilePurpose": st.sampled_from(
                    ["ChargePointMaxProfile", "TxDefaultProfile", "TxProfile"]
                ),
                "stackLevel": st.integers(min_value=-1, max_value=12),
            },
        ),
    ),
    st.tuples(
        st.just("GetCompositeSchedule"),
        st.fixed_dictionaries(
            {"connectorId": connector_ids, "duration": small_ints},
            optional={"chargingRateUnit": st.sampled_from(["A", "W"])},
        ),
    ),
    st.tuples(
        st.just("TriggerMessage"),
        st.fixed_dictionaries(
            {"requestedMessage": trigger_messages}, optional={"connectorId": connector_ids}
        ),
    ),
)
valid_calls = st.builds(lambda i, r: dumps([2, i, r[0], r[1]]), good_ids, valid_requests)
deep_frames = st.integers(min_value=20, max_value=200_000).map(lambda n: "[" * n + "]" * n)

frames = st.one_of(
    calls,
    valid_calls,
    valid_calls,
    calls_bad_id,
    malformed_calls,
    results,
    errors,
    st.text(max_size=200),
    json_values.map(dumps),
    st.binary(max_size=64),
    deep_frames,
)


def answerable_id(text: str | bytes) -> str | None:
    """The id of a CALL-shaped frame the agent must answer (exactly once); else None."""
    if isinstance(text, bytes):
        return None
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(frame, list) or len(frame) < 2 or isinstance(frame[0], bool):
        return None
    unique_id = frame[1]
    if frame[0] != 2 or not isinstance(unique_id, str) or not 0 < len(unique_id) <= 36:
        return None
    return unique_id


@dataclass
class Wire:
    """Every frame the agent sent to the CSMS (recorded in the CSMS's router)."""

    frames: list[Any] = field(default_factory=list)

    def answers(self, since: int = 0) -> list[list[Any]]:
        return [
            f for f in self.frames[since:] if isinstance(f, list) and len(f) > 1 and f[0] in (3, 4)
        ]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    recorder = Wire()
    original = csms_module._CsmsChargePoint.route_message

    async def route_message(self: Any, raw_msg: str) -> None:
        recorder.frames.append(json.loads(raw_msg))  # the agent only ever sends JSON
        await original(self, raw_msg)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "route_message", route_message)
    return recorder


@dataclass
class Progress:
    """Carried from one example to the next (one agent serves them all)."""

    probes: int = 0
    last_batch: list[str | bytes] = field(default_factory=list)


@pytest.fixture
def progress() -> Progress:
    return Progress()


async def send(csms: Csms, frame: str | bytes) -> None:
    await csms.wait_connected(CP_ID)
    await csms._cps[CP_ID]._connection.send(frame)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    # No shrinking: the agent is stateful (a failure need not replay), and a dead or stuck
    # agent would make every shrink attempt wait for its timeout. The failing batch is in
    # the assertion message instead.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(batch=st.lists(frames, min_size=1, max_size=6))
async def test_agent_survives_arbitrary_frames(
    booted: RunningAgent, csms: Csms, wire: Wire, progress: Progress, batch: list[str | bytes]
) -> None:
    assert booted.task is not None and not booted.task.done(), (
        f"the agent died after {progress.last_batch!r}"
    )
    progress.last_batch = batch
    connections = csms.connections
    mark = len(wire.frames)
    for frame in batch:
        await send(csms, frame)

    progress.probes += 1
    probe_id = f"probe-{progress.probes}"
    await send(csms, dumps([2, probe_id, "GetConfiguration", {"key": ["HeartbeatInterval"]}]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not any(a[1] == probe_id for a in wire.answers(mark)):
        assert booted.task is not None and not booted.task.done(), f"agent died on {batch!r}"
        assert loop.time() < deadline, f"no answer to the probe after {batch!r}"
        await asyncio.sleep(0.005)

    assert booted.task is not None and not booted.task.done(), f"agent died on {batch!r}"
    assert csms.connections == connections, f"the agent reconnected after {batch!r}"
    answers = [a for a in wire.answers(mark) if a[1] != probe_id]
    probe_answer = next(a for a in wire.answers(mark) if a[1] == probe_id)
    assert probe_answer[0] == 3, probe_answer
    assert probe_answer[2]["configurationKey"][0]["key"] == "HeartbeatInterval"

    expected = Counter(i for i in map(answerable_id, batch) if i is not None)
    got = Counter(a[1] for a in answers)
    assert got == expected, f"answers {answers!r} for {batch!r}"
    for answer in answers:
        if answer[0] == 4:
            assert len(answer) == 5, answer
            assert answer[2] in OCPP16_ERROR_CODES, f"{answer!r} for {batch!r}"
            assert answer[2] != "InternalError", f"{answer!r} for {batch!r}"
        else:
            assert len(answer) == 3 and isinstance(answer[2], dict), answer
    assert csms.errors == [], f"the agent sent an invalid message after {batch!r}"
