"""Long SendLocalLists against the running agent (issue 18): the agent checks and applies
them in steps (agent.ocpp.adapter, Authorizer.send_local_list_in_steps) and still answers
each CALL once, in order, with what the whole list earns: the schema error the library
gives the whole payload (computed here by the library itself, not by the code under test),
or the list applied whole. The stall figures are in bench/bench_hostile.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from ocpp.exceptions import FormatViolationError, OCPPError
from ocpp.messages import Call, _validate_payload

from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, AgentFactory, status_is

COUNT = 3000


def entries(count: int, status: str = "Accepted") -> list[dict[str, Any]]:
    return [{"idTag": f"L{n:07d}", "idTagInfo": {"status": status}} for n in range(count)]


def expected_error(payload: dict[str, Any]) -> str:
    """The CALLERROR code the library's schema check gives the whole payload (its
    FormatViolation is OCPP 1.6's FormationViolation)."""
    try:
        _validate_payload(Call("x", "SendLocalList", payload), "1.6")
    except FormatViolationError:
        return "FormationViolation"
    except OCPPError as exc:
        return str(exc.code)
    raise AssertionError("the payload is valid")


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Every CALLRESULT and CALLERROR the agent sent, in order."""
    seen: list[list[Any]] = []
    original = csms_module._CsmsChargePoint.route_message

    async def route_message(self: Any, raw_msg: str) -> None:
        frame = json.loads(raw_msg)
        if frame[0] in (3, 4):
            seen.append(frame)
        await original(self, raw_msg)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "route_message", route_message)
    return seen


async def answered(answers: list[list[Any]], ids: list[str], timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not set(ids) <= {a[1] for a in answers}:
        assert loop.time() < deadline, f"no answer to {ids} in {answers}"
        await asyncio.sleep(0.01)


def broken(kind: str) -> dict[str, Any]:
    """A SendLocalList of COUNT entries breaking the schema in one place."""
    items = entries(COUNT)
    payload: dict[str, Any] = {"listVersion": 9, "updateType": "Full"}
    if kind == "long idTag":
        items[-1]["idTag"] = "X" * 21
    elif kind == "unknown status":
        items[COUNT // 2]["idTagInfo"]["status"] = "Maybe"
    elif kind == "extra field":
        items[-2]["colour"] = "red"
    elif kind == "entry not an object":
        items[-1] = "L9"  # type: ignore[call-overload]
    elif kind == "update type":
        payload["updateType"] = "Partial"
    elif kind == "version type":
        payload["listVersion"] = "nine"
    elif kind == "extra top field":
        payload["note"] = 1
    # Errors in two places: the whole payload's check reports the first it meets.
    elif kind == "no update type, long idTag":
        del payload["updateType"]
        items[-1]["idTag"] = "X" * 21
    elif kind == "update type, long idTag":
        payload["updateType"] = "Partial"
        items[-1]["idTag"] = "X" * 21
    elif kind == "extra top field, long idTag":
        payload["note"] = 1
        items[-1]["idTag"] = "X" * 21
    elif kind == "no update type, unknown status":
        del payload["updateType"]
        items[COUNT // 2]["idTagInfo"]["status"] = "Maybe"
    elif kind == "version type, unknown status":
        payload["listVersion"] = "nine"
        items[COUNT // 2]["idTagInfo"]["status"] = "Maybe"
    payload["localAuthorizationList"] = items
    return payload


KINDS = ["long idTag", "unknown status", "extra field", "entry not an object", "update type",
         "version type", "extra top field", "no update type, long idTag",
         "update type, long idTag", "extra top field, long idTag",
         "no update type, unknown status", "version type, unknown status"]  # fmt: skip


async def test_long_lists_get_the_whole_payload_s_answer_once_and_in_order(
    make_agent: AgentFactory, csms: Csms, answers: list[list[Any]]
) -> None:
    await make_agent(ocpp={"SendLocalListMaxLength": 10_000, "LocalAuthListMaxLength": 10_000})
    await csms.wait_message("StatusNotification", status_is(1, "Available"))
    first = {"listVersion": 3, "updateType": "Full", "localAuthorizationList": entries(COUNT)}
    frames = [json.dumps([2, "first", "SendLocalList", first])]
    frames += [json.dumps([2, kind, "SendLocalList", broken(kind)]) for kind in KINDS]
    # A Differential update of every entry, then GetLocalListVersion at once behind it: it
    # is answered after the list, with the list's new version.
    diff = {"listVersion": 4, "updateType": "Differential",
            "localAuthorizationList": entries(COUNT, "Blocked")}  # fmt: skip
    frames += [json.dumps([2, "diff", "SendLocalList", diff])]
    frames += [json.dumps([2, "version", "GetLocalListVersion", {}])]
    for frame in frames:
        await csms.call_raw(CP_ID, frame)
    ids = ["first", *KINDS, "diff", "version"]
    await answered(answers, ids)
    assert [a[1] for a in answers] == ids  # one answer each, in order
    got = dict((a[1], a) for a in answers)
    assert got["first"][2] == {"status": "Accepted"}
    for kind in KINDS:
        expected = expected_error(broken(kind))
        assert got[kind][0] == 4 and got[kind][2] == expected, (kind, got[kind][:4])
    assert got["diff"][2] == {"status": "Accepted"}
    assert got["version"][2] == {"listVersion": 4}
