"""A whole charging session over WSS on the simulated hardware."""

from __future__ import annotations

from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, RunningAgent, status_is


async def test_swipe_plug_charge_unplug(booted: RunningAgent, csms: Csms) -> None:
    assert "plug in" in await booted.swipe("TAG-1")
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"))
    await booted.sim("plug")
    start = await csms.wait_message("StartTransaction")
    assert start.payload["idTag"] == "TAG-1"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    status = await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    tx_id = status["connectors"][0]["transaction_id"]
    mv = await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id)
    measurands = {sv["measurand"] for sv in mv.payload["meterValue"][0]["sampledValue"]}
    assert "Energy.Active.Import.Register" in measurands
    mark = len(csms.received)
    await booted.sim("unplug")
    stop = await csms.wait_message("StopTransaction")
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "EVDisconnected"
    assert stop.payload["meterStop"] > start.payload["meterStart"]
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert csms.errors == []


async def test_remote_start_stop(booted: RunningAgent, csms: Csms) -> None:
    await booted.sim("plug")
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="R1", connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    status = await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    tx_id = status["connectors"][0]["transaction_id"]
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert result["status"] == "Accepted"
    stop = await csms.wait_message("StopTransaction")
    assert stop.payload["reason"] == "Remote"
    await csms.wait_message("StatusNotification", status_is(1, "Finishing"))
    assert csms.errors == []
