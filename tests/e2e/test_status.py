"""Connector status as a CSMS operator sees it: every StatusNotification the agent sends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ocpp.v16 import call

from agent.ocpp.csms import Csms, Received
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    running_tx_id,
    status_is,
)


def position(csms: Csms, item: Received) -> int:
    """Where ``item`` (the very object) is in ``csms.received``."""
    return next(i for i, r in enumerate(csms.received) if r is item)


def tx_profile(limit_a: float, profile_id: int = 1) -> dict[str, Any]:
    return {
        "chargingProfileId": profile_id,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit_a}],
        },
    }


async def next_status(csms: Csms, connector: int, status: str, mark: int) -> dict[str, Any]:
    """The first StatusNotification ``status`` for ``connector`` received after ``mark``."""
    got = await csms.wait_message("StatusNotification", status_is(connector, status), after=mark)
    return got.payload


def statuses(csms: Csms, connector: int, after: int = 0) -> list[str]:
    return [
        r.payload["status"]
        for r in csms.received[after:]
        if r.action == "StatusNotification" and r.payload["connectorId"] == connector
    ]


async def sim_connector(agent: RunningAgent, connector: int = 1) -> dict[str, Any]:
    state = await agent.sim("state")
    found: dict[str, Any] = state["connectors"][connector - 1]
    return found


async def test_full_status_cycle(booted: RunningAgent, csms: Csms) -> None:
    """Available → Preparing → Charging → SuspendedEV → Charging → SuspendedEVSE → Charging
    → Finishing → Available, each reported once with errorCode NoError."""
    mark = len(csms.received)
    await booted.sim("plug")
    await next_status(csms, 1, "Preparing", mark)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="CYCLE", connector_id=1))
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "Charging", mark)
    tx_id = await running_tx_id(booted)

    await booted.sim("ev-pause")
    await next_status(csms, 1, "SuspendedEV", mark)
    m = len(csms.received)
    await booted.sim("ev-resume")
    await next_status(csms, 1, "Charging", m)

    m = len(csms.received)
    result = await csms.call(
        CP_ID,
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_profile(0)),
    )
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "SuspendedEVSE", m)
    sim = await sim_connector(booted)
    assert not sim["contactor_closed"]

    m = len(csms.received)
    result = await csms.call(
        CP_ID,
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_profile(16)),
    )
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "Charging", m)
    sim = await sim_connector(booted)
    assert sim["pilot_on"]
    assert sim["offered_current_a"] == 16
    assert sim["contactor_closed"]
    status = await booted.status()
    assert status["connectors"][0]["offered_current_a"] == 16

    m = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "Finishing", m)
    m = len(csms.received)
    await booted.sim("unplug")
    await next_status(csms, 1, "Available", m)

    seen = statuses(csms, 1, mark)
    assert seen == [
        "Preparing",
        "Charging",
        "SuspendedEV",
        "Charging",
        "SuspendedEVSE",
        "Charging",
        "Finishing",
        "Available",
    ], seen
    sent = [r.payload for r in csms.received[mark:] if r.action == "StatusNotification"]
    assert all(p["errorCode"] == "NoError" and "vendorErrorCode" not in p for p in sent)
    assert csms.errors == []


async def test_swipe_before_plug_is_preparing(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    assert "plug in" in await booted.swipe("EARLY")
    await next_status(csms, 1, "Preparing", mark)
    await booted.sim("plug")
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "EARLY"
    await next_status(csms, 1, "Charging", mark)
    # Preparing is reported once, not again when the cable arrives.
    assert statuses(csms, 1, mark) == ["Preparing", "Charging"]
    assert csms.errors == []


@pytest.mark.parametrize(
    ("fault", "error_code"),
    [("GroundFailure", "GroundFailure"), ("HighTemperature", "HighTemperature")],
)
async def test_controller_fault(
    booted: RunningAgent, csms: Csms, fault: str, error_code: str
) -> None:
    mark = len(csms.received)
    await booted.sim("fault", code=fault)
    faulted = await next_status(csms, 1, "Faulted", mark)
    assert faulted["errorCode"] == error_code
    assert faulted.get("vendorErrorCode"), "the controller's own code helps the field tech"
    m = len(csms.received)
    await booted.sim("clear-fault")
    cleared = await next_status(csms, 1, "Available", m)
    assert cleared["errorCode"] == "NoError"
    assert "vendorErrorCode" not in cleared
    assert csms.errors == []


async def test_fault_during_transaction_then_recovery(booted: RunningAgent, csms: Csms) -> None:
    await booted.sim("plug")
    await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="F1", connector_id=1))
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    mark = len(csms.received)
    await booted.sim("fault", code="GroundFailure")
    faulted = await next_status(csms, 1, "Faulted", mark)
    assert faulted["errorCode"] == "GroundFailure"
    sim = await sim_connector(booted)
    assert not sim["contactor_closed"], "no power flows on a faulted connector"
    m = len(csms.received)
    await booted.sim("clear-fault")
    await next_status(csms, 1, "Charging", m)
    assert csms.errors == []


async def test_meter_failure_is_faulted_then_recovers(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    await booted.sim("meter-silent")
    faulted = await next_status(csms, 1, "Faulted", mark)
    assert faulted["errorCode"] == "PowerMeterFailure"
    status = await booted.status()
    assert status["connectors"][0]["meter_ok"] is False
    m = len(csms.received)
    await booted.sim("meter-ok")
    recovered = await next_status(csms, 1, "Available", m)
    assert recovered["errorCode"] == "NoError"
    # Faulted only once: the misses after the limit are not reported again.
    assert statuses(csms, 1, mark) == ["Faulted", "Available"]
    assert csms.errors == []


async def test_unavailable_and_back(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "Unavailable", mark)
    # A vehicle plugged into an unavailable connector does not make it Preparing.
    await booted.sim("plug")
    await asyncio.sleep(0.5)
    assert statuses(csms, 1, mark) == ["Unavailable"]
    m = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Operative"))
    assert result["status"] == "Accepted"
    await next_status(csms, 1, "Preparing", m)
    assert csms.errors == []


async def test_connector_zero_reported_after_boot(booted: RunningAgent, csms: Csms) -> None:
    boot = next(i for i, r in enumerate(csms.received) if r.action == "BootNotification")
    zero = await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 0)
    assert position(csms, zero) > boot
    assert zero.payload["status"] == "Available"
    assert zero.payload["errorCode"] == "NoError"
    assert csms.errors == []


async def test_minimum_status_duration_hides_a_blip(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(ocpp={"MinimumStatusDuration": 2})
    await csms.wait_message("StatusNotification", status_is(1, "Available"))
    mark = len(csms.received)
    await agent.sim("plug")
    await agent.wait_status(lambda s: s["connectors"][0]["vehicle"] != "absent")
    await agent.sim("unplug")
    await agent.wait_status(lambda s: s["connectors"][0]["vehicle"] == "absent")
    await asyncio.sleep(2.5)
    assert statuses(csms, 1, mark) == []
    # A status that lasts is still reported, after the minimum duration.
    await agent.sim("plug")
    await next_status(csms, 1, "Preparing", mark)
    assert csms.errors == []


TRIGGERED = [
    "BootNotification",
    "DiagnosticsStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "StatusNotification",
]


@pytest.mark.parametrize("connector_id", [None, 1])
@pytest.mark.parametrize("message", TRIGGERED)
async def test_trigger_message(
    booted: RunningAgent, csms: Csms, message: str, connector_id: int | None
) -> None:
    mark = len(csms.received)
    result = await csms.call(
        CP_ID, call.TriggerMessage(requested_message=message, connector_id=connector_id)
    )
    assert result["status"] == "Accepted"
    got = await csms.wait_message(message, after=mark)
    if message == "StatusNotification":
        if connector_id is None:
            await csms.wait_message(
                "StatusNotification", lambda p: p["connectorId"] == 1, after=mark
            )
            await csms.wait_message(
                "StatusNotification", lambda p: p["connectorId"] == 0, after=mark
            )
        else:
            assert got.payload["connectorId"] == connector_id
        assert got.payload["status"] == "Available"
    elif message == "MeterValues":
        assert got.payload["connectorId"] == 1
        sampled = got.payload["meterValue"][0]["sampledValue"]
        assert {sv["context"] for sv in sampled} == {"Trigger"}
        assert "transactionId" not in got.payload
    elif message in ("DiagnosticsStatusNotification", "FirmwareStatusNotification"):
        assert got.payload["status"] == "Idle"
    assert csms.errors == []


async def test_trigger_message_unknown_connector(booted: RunningAgent, csms: Csms) -> None:
    for message in TRIGGERED:
        result = await csms.call(
            CP_ID, call.TriggerMessage(requested_message=message, connector_id=5)
        )
        assert result["status"] == "Rejected", message
    assert csms.errors == []
