"""A whole charging session over WSS on the simulated hardware."""

from __future__ import annotations

from typing import Any

from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, RunningAgent, running_tx_id, status_is


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


def energy_wh(payload: dict[str, Any]) -> float:
    """The Energy.Active.Import.Register of a MeterValues (Wh), asserting there is one."""
    values = []
    for mv in payload["meterValue"]:
        for sv in mv["sampledValue"]:
            if sv.get("measurand") == "Energy.Active.Import.Register":
                assert sv.get("unit", "Wh") == "Wh", sv
                values.append(float(sv["value"]))
    assert values, payload
    return values[-1]


def readings_of(csms: Csms, tx_id: int) -> list[float]:
    return [energy_wh(p) for p in csms.messages("MeterValues") if p.get("transactionId") == tx_id]


async def test_remote_start_stop_bills_the_metered_energy(booted: RunningAgent, csms: Csms) -> None:
    """RemoteStart, charge, RemoteStop: the CSMS sees the meter climb during the session,
    and the energy of the transaction (meterStop - meterStart) is what the meter's register
    says at the end."""
    await booted.sim("plug")
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="R1", connector_id=1))
    assert result["status"] == "Accepted"
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "R1"
    meter_start = start.payload["meterStart"]
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    tx_id = await running_tx_id(booted)
    # MeterValues arrive while the car charges, and the register climbs.
    await csms.wait_for(lambda: len(set(readings_of(csms, tx_id))) >= 2)
    readings = readings_of(csms, tx_id)
    assert readings == sorted(readings)
    assert meter_start <= readings[0] < readings[-1]
    # The car stops drawing and the register holds still. The second reading sent after
    # that (the first may have been taken just before)...
    await booted.sim("ev-pause")
    await booted.wait_status(lambda s: s["connectors"][0]["power_w"] == 0)
    for _ in range(2):
        last = await csms.wait_message(
            "MeterValues", lambda p: p.get("transactionId") == tx_id, after=len(csms.received)
        )
    final_wh = energy_wh(last.payload)
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert result["status"] == "Accepted"
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert stop.payload["reason"] == "Remote"
    # ...is what the transaction bills: meterStop - meterStart is the energy charged.
    assert stop.payload["meterStop"] - meter_start == round(final_wh) - meter_start > 0
    await csms.wait_message("StatusNotification", status_is(1, "Finishing"), after=mark)
    assert csms.errors == []
