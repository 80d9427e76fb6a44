"""The pre-check of raw CSMS frames (:mod:`agent.ocpp.precheck`): one decision per frame.

A table of hostile and ordinary frames with the decision each must get (the OCPP-J 1.6
Table 7 code, or pass, or drop), the frame limit against the largest SendLocalList the
configuration allows, and hypothesis fuzzing: the function never raises, always returns
exactly one decision, answers every CALL whose id it can read, and never passes on a frame
that makes the ``ocpp`` library's schema check fail with anything but an OCPP error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, _validate_payload

from agent.ocpp import precheck as pc
from agent.ocpp.precheck import Answer, Drop, Pass, precheck

HANDLED = frozenset(
    {
        "ChangeAvailability", "ChangeConfiguration", "ClearCache", "DataTransfer",
        "GetConfiguration", "RemoteStartTransaction", "RemoteStopTransaction", "Reset",
        "UnlockConnector", "SetChargingProfile", "ClearChargingProfile",
        "GetCompositeSchedule", "TriggerMessage", "SendLocalList", "GetLocalListVersion",
        "ReserveNow", "CancelReservation",
    }
)  # fmt: skip
MAX_LIST = 1000


def check(raw: str | bytes, max_list: int = MAX_LIST) -> pc.Decision:
    return precheck(raw, handled=HANDLED, send_local_list_max_length=max_list)


def profile(limit: str, min_rate: str = "6") -> str:
    return (
        '{"connectorId": 1, "csChargingProfiles": {"chargingProfileId": 1, "stackLevel": 0,'
        ' "chargingProfilePurpose": "TxDefaultProfile", "chargingProfileKind": "Relative",'
        f' "chargingSchedule": {{"chargingRateUnit": "A", "minChargingRate": {min_rate},'
        f' "chargingSchedulePeriod": [{{"startPeriod": 0, "limit": {limit}}}]}}}}}}'
    )


BIG = "9" * 5000
CASES: list[tuple[str, str, str | None]] = [
    # (frame, expected: "pass" / "drop" / "result" / a CallError code, cause contains)
    ('[2, "a", "Heartbeat", {}]', "NotSupported", "Heartbeat"),  # a CP->CSMS action
    ('[2, "a", "BootNotification", {}]', "NotSupported", None),
    ('[2, "a", "UpdateFirmware", {}]', "NotSupported", None),  # known, no handler here
    ('[2, "a", "FrobnicateConnector", {}]', "NotImplemented", "not an OCPP 1.6 action"),
    ('[2, "a", "", {}]', "NotImplemented", None),
    ('[2, "a", "ClearCache", {}]', "pass", None),
    ('[2, "a", "ClearCache"]', "FormationViolation", "CALL must be"),
    ('[2, "a", "ClearCache", []]', "FormationViolation", None),
    ('[2, "a", 7, {}]', "FormationViolation", None),
    ('[2, "a", "ClearCache", {"x": NaN}]', "FormationViolation", "NaN"),
    ('[2, "a", "ClearCache", {"x": -Infinity}]', "FormationViolation", "Infinity"),
    (f'[2, "a", "ClearCache", {{"x": {BIG}}}]', "TypeConstraintViolation", "5000 digits"),
    (f'[2, "a", "ClearCache", {{"x": -{BIG}}}]', "TypeConstraintViolation", None),
    ('[2, "a", "ClearCache", {"x": 9223372036854775808}]', "TypeConstraintViolation", "64"),
    ('[2, "a", "ClearCache", {"x": 9223372036854775807}]', "pass", None),
    ('[2, "a", ":", 9223372036854775808]', "TypeConstraintViolation", None),  # any action
    ('[2, "a", "ClearCache", {"x": 1e400}]', "TypeConstraintViolation", "double"),
    ('[2, "a", "ClearCache", {"x": 1e308}]', "pass", None),  # a number, not a rate
    (
        '[2, "a", "SetChargingProfile", ' + profile("1e308") + "]",
        "PropertyConstraintViolation",
        "limit",
    ),
    (
        '[2, "a", "SetChargingProfile", ' + profile("-1e30") + "]",
        "PropertyConstraintViolation",
        "limit",
    ),
    (
        '[2, "a", "SetChargingProfile", ' + profile("16", "1e28") + "]",
        "PropertyConstraintViolation",
        "minChargingRate",
    ),
    ('[2, "a", "SetChargingProfile", ' + profile("16.5") + "]", "pass", None),
    ('[2, "a", "SetChargingProfile", ' + profile("NaN") + "]", "FormationViolation", None),
    (
        '[2, "a", "RemoteStartTransaction", {"idTag": "\\ud800"}]',
        "PropertyConstraintViolation",
        "surrogate",
    ),
    (
        '[2, "a", "RemoteStartTransaction", {"idTag": "x\\udfff"}]',
        "PropertyConstraintViolation",
        None,
    ),
    (
        '[2, "a", "SendLocalList", {"listVersion": 1, "updateType": "Full", "localAuthorizationList":'
        ' [{"idTag": "\\ud83d"}]}]',
        "PropertyConstraintViolation",
        None,
    ),
    ('[2, "a", "ClearCache", {"\\udc00": 1}]', "PropertyConstraintViolation", None),  # a key
    ('[2, "a", "RemoteStartTransaction", {"idTag": "\\ud83d\\ude00"}]', "pass", None),  # a pair
    ('[2, "a", "RemoteStartTransaction", {"idTag": "a\\nb\\u001b[2J"}]', "pass", None),
    ('[2, "a", "ClearCache", ' + "[" * 40 + "]" * 40 + "]", "FormationViolation", None),
    (
        '[2, "a", "ClearCache", {"x": ' + "[" * 40 + "]" * 40 + "}]",
        "FormationViolation",
        "nests",
    ),
    (
        '[2, "a", "ClearCache", {"x": ' + "[" * 200_000 + "]" * 200_000 + "}]",
        "FormationViolation",
        None,
    ),
    ("[" * 200_000, "drop", None),
    ('[2, "a", "ClearCache", {]', "drop", "not JSON"),
    ('[2, "a", "ClearCache", {"x": "\x01"}]', "drop", "not JSON"),  # a raw control character
    ("[1, 2, 3]", "drop", None),
    ('[true, "a", "ClearCache", {}]', "drop", None),
    ('[2.0, "a", "ClearCache", {}]', "drop", None),
    ('[2, "", "ClearCache", {}]', "drop", "unique id"),
    ('[2, "' + "x" * 37 + '", "ClearCache", {}]', "drop", "unique id"),
    ('[2, 17, "ClearCache", {}]', "drop", "unique id"),
    ('[3, "a", {}]', "pass", None),
    ('[4, "a", "GenericError", "", {}]', "pass", None),
    ('[3, "a"]', "drop", "malformed"),
    ('[3, "a", {"x": NaN}]', "drop", None),
    ('[3, "a", {"interval": ' + "9" * 401 + "}]", "pass", None),  # the agent clamps it
    ('[3, "a", {"transactionId": 9223372036854775808}]', "pass", None),  # the agent refuses it
    ('[3, "a", {"x": ' + "9" * 5000 + "}]", "drop", "cannot be read"),
    ('[3, "a", {"x": 1e400}]', "drop", "cannot be read"),
    ('[3, "a", {"x": "\\ud800"}]', "drop", None),
    ("", "drop", None),
    ("null", "drop", None),
]


@pytest.mark.parametrize(("raw", "expected", "cause"), CASES)
def test_the_decision_for_each_frame(raw: str, expected: str, cause: str | None) -> None:
    decision = check(raw)
    if expected == "pass":
        assert isinstance(decision, Pass), decision
        assert decision.frame == json.loads(raw)
        return
    if expected == "drop":
        assert isinstance(decision, Drop), decision
        if cause:
            assert cause in decision.reason
        return
    assert isinstance(decision, Answer), decision
    assert decision.unique_id == "a"
    assert decision.code == expected
    assert decision.description == pc.DESCRIPTIONS[expected]
    if cause:
        assert cause in decision.details["cause"]
    sent = json.loads(decision.to_json())
    assert sent == [4, "a", expected, pc.DESCRIPTIONS[expected], decision.details]
    decision.to_json().encode("utf-8")  # always sendable


def test_table_7_descriptions_are_not_swapped() -> None:
    assert pc.DESCRIPTIONS["NotImplemented"] == "Requested Action is not known by receiver"
    assert pc.DESCRIPTIONS["NotSupported"] == (
        "Requested Action is recognized but not supported by the receiver"
    )


def test_a_binary_frame_is_dropped() -> None:
    decision = check(b'[2, "a", "ClearCache", {}]')
    assert isinstance(decision, Drop) and "binary" in decision.reason


def local_list(count: int, *, widest: bool) -> dict[str, Any]:
    tag = "\U0001f600" * 20 if widest else "TAG"
    entry = {
        "idTag": tag,
        "idTagInfo": {
            "expiryDate": "2026-12-06T12:00:00.123456+00:00",
            "parentIdTag": tag,
            "status": "ConcurrentTx",
        },
    }
    return {"listVersion": 2**31 - 1, "updateType": "Differential",
            "localAuthorizationList": [entry] * count}  # fmt: skip


@pytest.mark.parametrize("max_list", [1, 1000, 10_000])
def test_the_frame_limit_holds_the_largest_list_allowed(max_list: int) -> None:
    payload = local_list(max_list, widest=True)
    # Every optional field, non-BMP tags escaped (12 characters each), indented.
    raw = json.dumps([2, "x" * 36, "SendLocalList", payload], indent=2)
    assert len(raw) <= pc.frame_limit(max_list)
    decision = check(raw, max_list)
    assert isinstance(decision, Pass)
    # One entry more is refused by its count (a CALLRESULT Failed), not by its size.
    raw = json.dumps([2, "b", "SendLocalList", local_list(max_list + 1, widest=False)])
    assert check(raw, max_list) == Answer("b", None, payload={"status": "Failed"})
    assert json.loads(Answer("b", None, payload={"status": "Failed"}).to_json()) == [
        3, "b", {"status": "Failed"}
    ]  # fmt: skip


def test_a_long_list_is_counted_before_parsing_and_after() -> None:
    entries = [{"idTag": f"T{n}", "idTagInfo": {"status": "Accepted", "parentIdTag": "idTag"}}
               for n in range(3)]  # fmt: skip
    raw = json.dumps([2, "c", "SendLocalList", {"listVersion": 1, "updateType": "Full",
                                                "localAuthorizationList": entries}])  # fmt: skip
    assert isinstance(check(raw, 3), Pass)  # "idTag" as a value is not an entry
    assert check(raw, 2) == Answer("c", None, payload={"status": "Failed"})
    # Counted before parsing: the rest of the frame is never read.
    broken = raw[:-2] + ", ]]"
    assert check(broken, 2) == Answer("c", None, payload={"status": "Failed"})
    assert isinstance(check(broken, 3), Drop)
    # Keys written with escapes escape the first count, not the second.
    escaped = raw.replace('"idTag"', '"\\u0069dTag"')
    assert check(escaped, 2) == Answer("c", None, payload={"status": "Failed"})


def test_an_oversized_frame_gets_a_call_error_naming_the_limit_when_its_id_is_readable() -> None:
    limit = pc.frame_limit(MAX_LIST)
    raw = json.dumps([2, "big-1", "SendLocalList", local_list(12_000, widest=False)])
    assert len(raw) > limit
    decision = check(raw)
    assert isinstance(decision, Answer) and decision.code == "FormationViolation"
    assert decision.unique_id == "big-1"
    assert str(limit) in decision.details["cause"]
    # An escaped id is read too; an id that is not at the start is not looked for.
    raw = '[2, "q\\"\\u00e9", "DataTransfer", {"vendorId": "' + "v" * limit + '"}]'
    decision = check(raw)
    assert isinstance(decision, Answer) and decision.unique_id == 'q"\u00e9'
    raw = '{"x": [2, "id", "DataTransfer"], "y": "' + "v" * limit + '"}'
    assert isinstance(check(raw), Drop)


# ---------------------------------------------------------------------------- fuzzing

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udfffb", "\x1b[31m", "\n"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
actions = st.sampled_from(sorted(pc.OCPP16_ACTIONS)) | st.text(max_size=20)
ids = st.text(min_size=1, max_size=36) | st.text(max_size=50) | st.integers()


def encode(value: Any) -> str:
    return json.dumps(value)  # NaN/Infinity/huge integers: Python writes them


frames = st.one_of(
    st.builds(lambda i, a, p: encode([2, i, a, p]), ids, actions, json_values),
    st.builds(lambda i, p: encode([3, i, p]), ids, json_values),
    st.builds(lambda v: encode(v), json_values),
    st.text(max_size=300),
    st.binary(max_size=40),
    st.builds(
        lambda i, n: f'[2, {json.dumps(i)}, "ClearCache", {{"n": {"9" * n}}}]',
        ids,
        st.integers(1, 6000),
    ),
    st.builds(
        lambda i, d: f'[2, {json.dumps(i)}, "ClearCache", {{"d": {"[" * d}{"]" * d}}}]',
        ids,
        st.integers(1, 5000),
    ),
)


@settings(max_examples=600, deadline=None)
@given(frames, st.integers(0, 5000))
def test_fuzz_never_raises_and_answers_every_readable_call(raw: str | bytes, max_list: int) -> None:
    decision = check(raw, max_list)
    assert isinstance(decision, Pass | Answer | Drop)
    if isinstance(decision, Drop):
        assert not decision.reason.startswith("pre-check failed"), decision.reason
        assert "\n" not in decision.reason
    elif isinstance(decision, Answer):
        decision.to_json().encode("utf-8")
        assert decision.code in pc.DESCRIPTIONS or decision.code is None
        assert decision.code != "InternalError"
    else:
        assert decision.frame[0] in (2, 3, 4)
    # A parseable CALL with a valid id is never dropped (it gets its one answer).
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError, TypeError):
        return
    if (
        isinstance(frame, list)
        and len(frame) > 1
        and type(frame[0]) is int
        and frame[0] == 2
        and isinstance(frame[1], str)
        and 0 < len(frame[1]) <= 36
        and isinstance(raw, str)
        and len(raw) <= pc.frame_limit(max_list)
    ):
        assert not isinstance(decision, Drop), (raw, decision)


rates = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**30), 10**30),
    st.integers(0, 800).map(lambda n: n / 10),
)


@settings(max_examples=300, deadline=None)
@given(rates, rates, st.sampled_from(["SetChargingProfile", "RemoteStartTransaction"]))
def test_what_passes_never_breaks_the_library_schema_check(
    limit: float, min_rate: float, action: str
) -> None:
    schedule = {"chargingRateUnit": "A", "minChargingRate": min_rate,
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}  # fmt: skip
    body = {"chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative", "chargingSchedule": schedule}  # fmt: skip
    payload = (
        {"connectorId": 1, "csChargingProfiles": body}
        if action == "SetChargingProfile"
        else {"idTag": "T", "chargingProfile": body}
    )
    decision = check(json.dumps([2, "a", action, payload]))
    if isinstance(decision, Answer):
        assert decision.code in ("PropertyConstraintViolation", "TypeConstraintViolation")
        return
    assert isinstance(decision, Pass)
    try:
        _validate_payload(Call("a", action, decision.frame[3]), "1.6")
    except OCPPError:
        pass  # a CALLERROR the library answers (e.g. not a multiple of 0.1): fine


def test_a_call_whose_id_is_all_escaped_astral_characters_is_still_answered() -> None:
    """36 characters outside the BMP, each written as a 12-character escape pair (found by
    the hostile-CSMS test): the id is read and the broken CALL answered, not dropped."""
    unique_id = "\U0001f600" * 36
    raw = "[2, " + json.dumps(unique_id) + ', "RemoteStopTransaction", {"transactionId": Infinity}]'
    decision = check(raw)
    assert isinstance(decision, Answer)
    assert json.loads(decision.to_json())[1] == unique_id
