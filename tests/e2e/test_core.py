"""Every OCPP 1.6 Core message, end to end, as a CSMS operator would notice it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ocpp.exceptions import OccurenceConstraintViolationError
from ocpp.v16 import call

from agent.ocpp.csms import Csms, Received
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    running_tx_id,
    start_charging,
    status_is,
)


def position(csms: Csms, item: Received) -> int:
    """Where ``item`` (the very object) is in ``csms.received``."""
    return next(i for i, r in enumerate(csms.received) if r is item)


async def get_config(csms: Csms, *keys: str) -> dict[str, Any]:
    result = await csms.call(CP_ID, call.GetConfiguration(key=list(keys) if keys else None))
    return result


def config_value(result: dict[str, Any], key: str) -> str | None:
    for entry in result.get("configurationKey", []):
        if entry["key"] == key:
            value: str | None = entry.get("value")
            return value
    raise KeyError(key)


def actions(csms: Csms, after: int = 0) -> list[str]:
    return [r.action for r in csms.received[after:]]


# ---------------------------------------------------------------------- ChangeAvailability
async def test_change_availability_connector(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Unavailable"), after=mark)
    sim = (await booted.sim("state"))["connectors"][0]
    assert sim["controller_mode"] == "disabled"
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Operative"))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert csms.errors == []


async def test_change_availability_scheduled_during_transaction(
    booted: RunningAgent, csms: Csms
) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert result["status"] == "Scheduled"
    await asyncio.sleep(0.5)
    # The running transaction is not disturbed.
    assert "StatusNotification" not in actions(csms, mark)
    sim = (await booted.sim("state"))["connectors"][0]
    assert sim["contactor_closed"]
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    stop = await csms.wait_message("StopTransaction", after=mark)
    unavailable = await csms.wait_message(
        "StatusNotification", status_is(1, "Unavailable"), after=mark
    )
    assert position(csms, stop) < position(csms, unavailable)
    # No transaction can start on it now.
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="X", connector_id=1))
    assert result["status"] == "Rejected"
    assert csms.errors == []


async def test_change_availability_operative_cancels_scheduled(
    booted: RunningAgent, csms: Csms
) -> None:
    tx_id = await start_charging(booted, csms)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert result["status"] == "Scheduled"
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Operative"))
    assert result["status"] == "Accepted"
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await csms.wait_message("StatusNotification", status_is(1, "Finishing"), after=mark)
    await booted.sim("unplug")
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert "Unavailable" not in [
        r.payload["status"] for r in csms.received[mark:] if r.action == "StatusNotification"
    ]
    assert csms.errors == []


async def test_change_availability_connector_zero(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=0, type="Inoperative"))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(0, "Unavailable"), after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Unavailable"), after=mark)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=0, type="Operative"))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(0, "Available"), after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert csms.errors == []


async def test_change_availability_connector_zero_during_transaction(
    booted: RunningAgent, csms: Csms
) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=0, type="Inoperative"))
    assert result["status"] == "Scheduled"
    await asyncio.sleep(0.5)
    sim = (await booted.sim("state"))["connectors"][0]
    assert sim["contactor_closed"], "a scheduled change must not cut the running charge"
    assert "StatusNotification" not in actions(csms, mark)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Unavailable"), after=mark)
    await csms.wait_message("StatusNotification", status_is(0, "Unavailable"), after=mark)
    assert csms.errors == []


async def test_change_availability_unknown_connector(booted: RunningAgent, csms: Csms) -> None:
    result = await csms.call(CP_ID, call.ChangeAvailability(connector_id=7, type="Inoperative"))
    assert result["status"] == "Rejected"
    assert csms.errors == []


# ---------------------------------------------------------------------- configuration
async def test_change_configuration_accepted(booted: RunningAgent, csms: Csms) -> None:
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="5")
    )
    assert result["status"] == "Accepted"
    shown = await get_config(csms, "MeterValueSampleInterval")
    assert config_value(shown, "MeterValueSampleInterval") == "5"
    assert csms.errors == []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("MeterValueSampleInterval", "abc", "Rejected"),
        ("MeterValuesSampledData", "Foo.Bar", "Rejected"),
        ("MeterValuesSampledData", "Energy.Active.Import.Register,SoC", "Rejected"),
        ("NumberOfConnectors", "2", "Rejected"),
        ("NoSuchKey", "1", "NotSupported"),
        ("ConnectorPhaseRotation", "0.RST,1.RST", "RebootRequired"),
    ],
)
async def test_change_configuration_statuses(
    booted: RunningAgent, csms: Csms, key: str, value: str, expected: str
) -> None:
    before = await get_config(csms, key)
    result = await csms.call(CP_ID, call.ChangeConfiguration(key=key, value=value))
    assert result["status"] == expected
    after = await get_config(csms, key)
    if expected == "NotSupported":
        assert after["unknownKey"] == [key]
    elif expected == "Rejected":
        assert config_value(after, key) == config_value(before, key)
    else:
        assert config_value(after, key) == value
    assert csms.errors == []


async def test_configuration_persists_across_restart(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    changes = {
        "MeterValueSampleInterval": "7",
        "MeterValuesSampledData": "Energy.Active.Import.Register,Power.Active.Import",
        "ConnectorPhaseRotation": "0.RST,1.STR",
        "AuthorizeRemoteTxRequests": "true",
    }
    for key, value in changes.items():
        result = await csms.call(CP_ID, call.ChangeConfiguration(key=key, value=value))
        assert result["status"] in ("Accepted", "RebootRequired")
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    await csms.wait_message("BootNotification", after=mark)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=mark)
    shown = await get_config(csms, *changes)
    assert {key: config_value(shown, key) for key in changes} == changes
    assert csms.errors == []


async def test_get_configuration_all_and_some(booted: RunningAgent, csms: Csms) -> None:
    everything = await get_config(csms)
    keys = {e["key"]: e for e in everything["configurationKey"]}
    assert "unknownKey" not in everything or everything["unknownKey"] == []
    for core in (
        "HeartbeatInterval",
        "MeterValueSampleInterval",
        "MeterValuesSampledData",
        "NumberOfConnectors",
        "SupportedFeatureProfiles",
        "AuthorizeRemoteTxRequests",
        "ConnectionTimeOut",
    ):
        assert core in keys, core
    assert keys["NumberOfConnectors"] == {"key": "NumberOfConnectors", "readonly": True,
                                          "value": "1"}  # fmt: skip
    assert keys["MeterValueSampleInterval"]["readonly"] is False
    assert "Core" in keys["SupportedFeatureProfiles"]["value"].split(",")
    # A secret never leaves the charger.
    assert "AuthorizationKey" not in keys

    some = await get_config(csms, "HeartbeatInterval", "Nope", "AuthorizationKey")
    assert [e["key"] for e in some["configurationKey"]] == ["HeartbeatInterval"]
    assert sorted(some["unknownKey"]) == ["AuthorizationKey", "Nope"]
    assert csms.errors == []


async def test_get_configuration_beyond_max_keys_is_refused_whole(
    booted: RunningAgent, csms: Csms
) -> None:
    """More keys than GetConfigurationMaxKeys: a CALLERROR that says so, not an answer
    that silently leaves keys out; the connection carries on."""
    limit = int(config_value(await get_config(csms, "GetConfigurationMaxKeys"),
                             "GetConfigurationMaxKeys") or 0)  # fmt: skip
    keys = ["HeartbeatInterval"] * limit
    assert len((await get_config(csms, *keys))["configurationKey"]) >= 1  # at the limit: fine
    with pytest.raises(OccurenceConstraintViolationError) as refused:
        await get_config(csms, *keys, "MeterValueSampleInterval")
    assert f"GetConfigurationMaxKeys is {limit}" in str(refused.value.description)
    assert config_value(await get_config(csms, "MeterValueSampleInterval"),
                        "MeterValueSampleInterval") is not None  # fmt: skip


async def test_clear_cache_and_data_transfer(booted: RunningAgent, csms: Csms) -> None:
    result = await csms.call(CP_ID, call.ClearCache())
    assert result["status"] == "Accepted"
    result = await csms.call(
        CP_ID, call.DataTransfer(vendor_id="com.example", message_id="hello", data="x")
    )
    assert result["status"] == "UnknownVendorId"
    assert csms.errors == []


async def test_heartbeat_at_boot_interval(make_agent: AgentFactory, csms: Csms) -> None:
    csms.boot_response = ("Accepted", 1)
    await make_agent()
    boot = await csms.wait_message("BootNotification")
    first = await csms.wait_message("Heartbeat", timeout_s=5)
    await csms.wait_for(lambda: len(csms.messages("Heartbeat")) >= 2, timeout_s=5)
    assert position(csms, boot) < position(csms, first)
    shown = await get_config(csms, "HeartbeatInterval")
    assert config_value(shown, "HeartbeatInterval") == "1"
    assert csms.errors == []


# ---------------------------------------------------------------------- remote start / stop
async def test_remote_start_authorizes_first(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(ocpp={"AuthorizeRemoteTxRequests": True})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await agent.sim("plug")
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="AUTH-1", connector_id=1))
    assert result["status"] == "Accepted"
    start = await csms.wait_message("StartTransaction", after=mark)
    auth = await csms.wait_message("Authorize", after=mark)
    assert auth.payload["idTag"] == "AUTH-1"
    assert position(csms, auth) < position(csms, start)
    assert csms.errors == []


async def test_remote_start_refused_tag_with_authorize(
    make_agent: AgentFactory, csms: Csms
) -> None:
    csms.accepted_tags = {"GOOD"}
    agent: RunningAgent = await make_agent(ocpp={"AuthorizeRemoteTxRequests": True})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await agent.sim("plug")
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="BAD", connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("Authorize", after=mark)
    await asyncio.sleep(0.5)
    assert "StartTransaction" not in actions(csms, mark)
    assert csms.errors == []


async def test_remote_start_busy_and_remote_stop_unknown(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="T2", connector_id=1))
    assert result["status"] == "Rejected"
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="T2"))
    assert result["status"] == "Rejected"
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="T2", connector_id=3))
    assert result["status"] == "Rejected"
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id + 100))
    assert result["status"] == "Rejected"
    assert (await booted.status())["connectors"][0]["transaction_id"] == tx_id
    assert csms.errors == []


# ---------------------------------------------------------------------- reset
@pytest.mark.parametrize(("kind", "reason"), [("Soft", "SoftReset"), ("Hard", "HardReset")])
async def test_reset_during_transaction(
    booted: RunningAgent, csms: Csms, kind: str, reason: str
) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.Reset(type=kind))
    assert result["status"] == "Accepted"
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == reason
    boot = await csms.wait_message("BootNotification", after=mark)
    assert position(csms, stop) < position(csms, boot)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=mark)
    assert booted.restarts == [kind]
    # Exactly one StopTransaction: the restart does not stop it a second time.
    await asyncio.sleep(0.3)
    assert actions(csms, mark).count("StopTransaction") == 1
    assert csms.errors == []


@pytest.mark.parametrize("cable", ["tethered", "socket"])
async def test_unlock_connector_not_supported(
    make_agent: AgentFactory, csms: Csms, cable: str
) -> None:
    """The simulated OpenEVSE controller drives no lock: NotSupported (a socket outlet
    too: "Unlocked" would be a lie), and a running transaction is left alone."""
    agent = await make_agent(hardware_extra=f'cable = "{cable}"')
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    result = await csms.call(CP_ID, call.UnlockConnector(connector_id=1))
    assert result["status"] == "NotSupported"
    result = await csms.call(CP_ID, call.UnlockConnector(connector_id=9))
    assert result["status"] == "NotSupported"
    status = await agent.status()
    assert status["connectors"][0]["transaction_id"] == tx_id
    assert csms.errors == []


# ---------------------------------------------------------------------- stop reasons
async def test_stop_reason_local(booted: RunningAgent, csms: Csms) -> None:
    await booted.swipe("LOCAL-1")
    await booted.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    tx_id = await running_tx_id(booted)
    mark = len(csms.received)
    assert "stopped" in await booted.swipe("LOCAL-1")
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "Local"
    assert stop.payload["idTag"] == "LOCAL-1"
    await csms.wait_message("StatusNotification", status_is(1, "Finishing"), after=mark)
    assert csms.errors == []


async def test_stop_reason_ev_disconnected(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    await booted.sim("unplug")
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "EVDisconnected"
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert csms.errors == []


async def test_stop_reason_remote(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert result["status"] == "Accepted"
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "Remote"
    assert csms.errors == []


async def test_stop_reason_deauthorized(booted: RunningAgent, csms: Csms) -> None:
    csms.accepted_tags = {"GOOD"}
    await booted.sim("plug")
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="BAD", connector_id=1))
    assert result["status"] == "Accepted"
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "BAD"
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["reason"] == "DeAuthorized"
    assert stop.payload["meterStop"] >= start.payload["meterStart"]
    await csms.wait_message("StatusNotification", status_is(1, "Finishing"), after=mark)
    status = await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is None)
    assert status["connectors"][0]["offered_current_a"] == 0
    assert csms.errors == []


# ---------------------------------------------------------------------- boot
async def test_boot_pending(make_agent: AgentFactory, csms: Csms) -> None:
    csms.boot_response = ("Pending", 1)
    await make_agent()
    await csms.wait_for(lambda: len(csms.messages("BootNotification")) >= 2)
    shown = await get_config(csms, "HeartbeatInterval")
    assert len(shown["configurationKey"]) == 1
    assert not {"StatusNotification", "Heartbeat"} & set(actions(csms))
    csms.boot_response = ("Accepted", 300)
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.TriggerMessage(requested_message="BootNotification"))
    assert result["status"] == "Accepted"
    boot = await csms.wait_message("BootNotification", after=mark)
    zero = await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 0,
                                   after=mark)  # fmt: skip
    one = await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1,
                                  after=mark)  # fmt: skip
    assert position(csms, boot) < position(csms, zero)
    assert one.payload["status"] == "Available"
    assert csms.errors == []


async def test_boot_rejected(make_agent: AgentFactory, csms: Csms) -> None:
    csms.boot_response = ("Rejected", 1)
    agent: RunningAgent = await make_agent()
    await csms.wait_for(lambda: len(csms.messages("BootNotification")) >= 2)
    await agent.sim("plug")  # a status change while rejected is not sent either
    await csms.wait_for(lambda: len(csms.messages("BootNotification")) >= 3)
    assert set(actions(csms)) == {"BootNotification"}
    assert (await agent.status())["csms"]["registered"] is False
    csms.boot_response = ("Accepted", 300)
    mark = len(csms.received)
    preparing = await csms.wait_message("StatusNotification", status_is(1, "Preparing"), after=mark)
    assert preparing.payload["errorCode"] == "NoError"
    assert csms.errors == []


# ---------------------------------------------------------------------- power loss
async def test_restart_mid_session_stops_with_power_loss(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    start = csms.messages("StartTransaction")[-1]
    # Let some energy flow, then freeze it (the EV pauses) so that the register is stable.
    await booted.wait_status(lambda s: s["connectors"][0]["energy_wh"] > start["meterStart"] + 100)
    await booted.sim("ev-pause")
    await csms.wait_message("StatusNotification", status_is(1, "SuspendedEV"))
    first = await booted.wait_status(lambda s: s["connectors"][0]["power_w"] == 0)
    await asyncio.sleep(1.2)  # more than two meter polls
    shown = await booted.status()
    assert abs(shown["connectors"][0]["energy_wh"] - first["connectors"][0]["energy_wh"]) < 1
    energy_wh = shown["connectors"][0]["energy_wh"]

    await booted.stop()
    mark = len(csms.received)
    await booted.start()
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "PowerLoss"
    assert isinstance(stop.payload["meterStop"], int)
    assert stop.payload["meterStop"] >= start["meterStart"]
    assert abs(stop.payload["meterStop"] - energy_wh) <= 1
    # Booted again, the connector reports its status again.
    await csms.wait_message("BootNotification", after=mark)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=mark)
    assert booted.restarts == []
    assert csms.errors == []


async def test_remote_stop_and_unplug_at_once_send_one_stop_transaction(
    booted: RunningAgent, csms: Csms
) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    await asyncio.gather(
        csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id)),
        booted.sim("unplug"),
    )
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    await asyncio.sleep(0.5)
    assert actions(csms, mark).count("StopTransaction") == 1
    assert csms.errors == []
