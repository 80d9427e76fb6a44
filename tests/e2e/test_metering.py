"""What the CSMS receives as meter data: MeterValues, meterStart/meterStop, transactionData.

The simulated charger: three phases at 230 V, an SDM630 meter, an EV that draws 32 A per
phase (22 080 W) unless told otherwise; one wall-clock second is one simulated hour.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    running_tx_id,
    start_charging,
    status_is,
)

FULL_POWER_W = 3 * 230 * 32


async def sim_energy_wh(agent: RunningAgent) -> float:
    state = await agent.sim("state")
    return float(state["connectors"][0]["energy_wh"])


def energy_above(wh: float, status: dict[str, Any]) -> bool:
    return float(status["connectors"][0]["energy_wh"]) > wh


def sampled(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [sv for mv in message["meterValue"] for sv in mv["sampledValue"]]


def by_measurand(values: list[dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(sv["measurand"], sv.get("phase")): sv for sv in values}


def close_to(value: str, expected: float, rel: float = 0.02) -> bool:
    return abs(float(value) - expected) <= rel * expected


async def wait_meter_values(
    csms: Csms, match: Any, *, after: int, timeout_s: float = 10.0
) -> dict[str, Any]:
    got = await csms.wait_message("MeterValues", match, after=after, timeout_s=timeout_s)
    return got.payload


def with_power(expected_w: float) -> Any:
    """A periodic MeterValues whose Power.Active.Import is ``expected_w`` (±2 %)."""

    def match(payload: dict[str, Any]) -> bool:
        values = by_measurand(sampled(payload))
        power = values.get(("Power.Active.Import", None))
        return power is not None and close_to(power["value"], expected_w)

    return match


async def test_meter_values_content_while_charging(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    mv = await wait_meter_values(csms, lambda p: p.get("transactionId") == tx_id, after=mark)
    assert mv["connectorId"] == 1
    assert len(mv["meterValue"]) == 1
    values = sampled(mv)
    assert {sv["context"] for sv in values} == {"Sample.Periodic"}
    assert {sv["location"] for sv in values} == {"Outlet"}
    found = by_measurand(values)
    assert set(found) == {
        ("Energy.Active.Import.Register", None),
        ("Power.Active.Import", None),
        ("Current.Import", "L1"),
        ("Current.Import", "L2"),
        ("Current.Import", "L3"),
        ("Voltage", "L1-N"),
        ("Voltage", "L2-N"),
        ("Voltage", "L3-N"),
        ("Current.Offered", None),
    }
    energy = found[("Energy.Active.Import.Register", None)]
    assert energy["unit"] == "Wh"
    assert energy["value"].isdigit()
    start = csms.messages("StartTransaction")[-1]
    assert int(energy["value"]) >= start["meterStart"]
    power = found[("Power.Active.Import", None)]
    assert power["unit"] == "W"
    assert close_to(power["value"], FULL_POWER_W), power
    for phase in ("L1", "L2", "L3"):
        current = found[("Current.Import", phase)]
        assert current["unit"] == "A"
        assert close_to(current["value"], 32), current
        voltage = found[("Voltage", f"{phase}-N")]
        assert voltage["unit"] == "V"
        assert close_to(voltage["value"], 230), voltage
    offered = found[("Current.Offered", None)]
    assert offered["unit"] == "A"
    assert float(offered["value"]) == 32
    # The register only goes up from one sample to the next.
    later = await wait_meter_values(
        csms, lambda p: p.get("transactionId") == tx_id, after=len(csms.received)
    )
    later_energy = by_measurand(sampled(later))[("Energy.Active.Import.Register", None)]
    assert int(later_energy["value"]) > int(energy["value"])
    assert csms.errors == []


async def test_sampled_data_setting_is_honoured(make_agent: AgentFactory, csms: Csms) -> None:
    wanted = "Energy.Active.Import.Register,Power.Active.Import"
    agent: RunningAgent = await make_agent(ocpp={"MeterValuesSampledData": wanted})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    mv = await wait_meter_values(
        csms, lambda p: p.get("transactionId") == tx_id, after=len(csms.received)
    )
    assert [sv["measurand"] for sv in sampled(mv)] == wanted.split(",")
    # Changed at run time, the next samples follow the new list.
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="MeterValuesSampledData", value="Current.Offered")
    )
    assert result["status"] == "Accepted"
    mark = len(csms.received)
    mv = await wait_meter_values(csms, lambda p: p.get("transactionId") == tx_id, after=mark)
    assert [sv["measurand"] for sv in sampled(mv)] == ["Current.Offered"]
    assert csms.errors == []


async def test_sample_interval_change_reschedules(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(ocpp={"MeterValueSampleInterval": 60})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    mark = len(csms.received)
    await asyncio.sleep(1.5)
    assert csms.messages("MeterValues") == []
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="1")
    )
    assert result["status"] == "Accepted"
    await csms.wait_for(
        lambda: sum(1 for r in csms.received[mark:] if r.action == "MeterValues") >= 2,
        timeout_s=10,
    )
    assert {p["transactionId"] for p in csms.messages("MeterValues")} == {tx_id}
    # 0 switches periodic sampling off.
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="0")
    )
    assert result["status"] == "Accepted"
    await asyncio.sleep(0.3)  # a sample already on its way may still arrive
    count = len(csms.messages("MeterValues"))
    await asyncio.sleep(1.5)
    assert len(csms.messages("MeterValues")) == count
    assert csms.errors == []


async def test_clock_aligned_data(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(
        ocpp={"ClockAlignedDataInterval": 1, "MeterValueSampleInterval": 0}
    )
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    # Idle: clock-aligned values still come, without a transaction.
    idle = await wait_meter_values(csms, None, after=0)
    assert "transactionId" not in idle
    values = sampled(idle)
    assert [sv["measurand"] for sv in values] == ["Energy.Active.Import.Register"]
    assert values[0]["context"] == "Sample.Clock"
    assert values[0]["unit"] == "Wh"
    # Stamped with the aligned instant: a whole second.
    assert idle["meterValue"][0]["timestamp"].endswith(".000Z"), idle["meterValue"][0]
    tx_id = await start_charging(agent, csms)
    mark = len(csms.received)
    during = await wait_meter_values(csms, lambda p: p.get("transactionId") == tx_id, after=mark)
    assert {sv["context"] for sv in sampled(during)} == {"Sample.Clock"}
    assert csms.errors == []


async def test_stop_txn_sampled_data(make_agent: AgentFactory, csms: Csms) -> None:
    """transactionData: Transaction.Begin, then StopTxnSampledData every
    MeterValueSampleInterval (Sample.Periodic) and StopTxnAlignedData every
    ClockAlignedDataInterval (Sample.Clock), then Transaction.End; in time order."""
    agent: RunningAgent = await make_agent(
        ocpp={
            "StopTxnSampledData": "Energy.Active.Import.Register,Current.Offered",
            "StopTxnAlignedData": "Energy.Active.Import.Register",
            "ClockAlignedDataInterval": 1,
        }
    )
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    start = csms.messages("StartTransaction")[-1]
    await agent.wait_status(lambda s: s["connectors"][0]["energy_wh"] > start["meterStart"] + 500)
    await csms.wait_for(
        lambda: len([m for m in csms.messages("MeterValues") if m.get("transactionId")]) >= 4,
        timeout_s=15,
    )
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    stop = (await csms.wait_message("StopTransaction", after=mark)).payload
    data = stop["transactionData"]
    contexts = [{sv["context"] for sv in mv["sampledValue"]} for mv in data]
    assert contexts[0] == {"Transaction.Begin"} and contexts[-1] == {"Transaction.End"}
    middle = [c.pop() for c in contexts[1:-1]]
    assert "Sample.Periodic" in middle and "Sample.Clock" in middle, middle
    for mv in data[1:-1]:
        measurands = {sv["measurand"] for sv in mv["sampledValue"]}
        if mv["sampledValue"][0]["context"] == "Sample.Clock":
            assert measurands == {"Energy.Active.Import.Register"}
        else:
            assert measurands == {"Energy.Active.Import.Register", "Current.Offered"}
    begin, end = by_measurand(data[0]["sampledValue"]), by_measurand(data[-1]["sampledValue"])
    assert (
        set(begin)
        == set(end)
        == {
            ("Energy.Active.Import.Register", None),
            ("Current.Offered", None),
        }
    )
    assert int(begin[("Energy.Active.Import.Register", None)]["value"]) == start["meterStart"]
    assert int(end[("Energy.Active.Import.Register", None)]["value"]) == stop["meterStop"]
    assert float(end[("Current.Offered", None)]["value"]) == 32
    assert data[0]["timestamp"] == start["timestamp"]
    assert data[-1]["timestamp"] == stop["timestamp"]
    stamps = [mv["timestamp"] for mv in data]
    assert stamps == sorted(stamps)
    registers = [
        int(float(sv["value"]))
        for mv in data
        for sv in mv["sampledValue"]
        if sv["measurand"] == "Energy.Active.Import.Register"
    ]
    assert registers == sorted(registers)
    assert csms.errors == []


async def test_energy_matches_the_meter(booted: RunningAgent, csms: Csms) -> None:
    """meterStop - meterStart equals the energy the (simulated) meter counted."""
    for session in range(2):
        await booted.sim("plug")
        await csms.wait_message(
            "StatusNotification", status_is(1, "Preparing"), after=len(csms.received) - 1
        )
        before = await sim_energy_wh(booted)  # the pilot is off: nothing flows yet
        mark = len(csms.received)
        result = await csms.call(
            CP_ID, call.RemoteStartTransaction(id_tag=f"E{session}", connector_id=1)
        )
        assert result["status"] == "Accepted"
        await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
        tx_id = await running_tx_id(booted)
        start = (await csms.wait_message("StartTransaction", after=mark)).payload
        await booted.wait_status(functools.partial(energy_above, before + 2000))
        # Freeze the register (the EV pauses), then stop.
        await booted.sim("ev-pause")
        await csms.wait_message("StatusNotification", status_is(1, "SuspendedEV"), after=mark)
        after = await sim_energy_wh(booted)
        await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
        stop = (await csms.wait_message("StopTransaction", after=mark)).payload
        assert isinstance(start["meterStart"], int)
        assert isinstance(stop["meterStop"], int)
        assert abs(start["meterStart"] - before) <= 1
        assert abs(stop["meterStop"] - after) <= 1
        assert abs((stop["meterStop"] - start["meterStart"]) - (after - before)) <= 2
        assert await sim_energy_wh(booted) == after
        m = len(csms.received)
        await booted.sim("ev-resume")
        await booted.sim("unplug")
        await csms.wait_message("StatusNotification", status_is(1, "Available"), after=m)
    assert csms.errors == []


async def test_power_follows_ev_max_current(booted: RunningAgent, csms: Csms) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    await wait_meter_values(
        csms, lambda p: p.get("transactionId") == tx_id and with_power(FULL_POWER_W)(p), after=mark
    )
    await booted.sim("ev-max-current", current_a=10)
    mark = len(csms.received)
    mv = await wait_meter_values(
        csms, lambda p: p.get("transactionId") == tx_id and with_power(3 * 230 * 10)(p), after=mark
    )
    found = by_measurand(sampled(mv))
    for phase in ("L1", "L2", "L3"):
        assert close_to(found[("Current.Import", phase)]["value"], 10)
    # The EVSE still offers 32 A: the car takes less.
    assert float(found[("Current.Offered", None)]["value"]) == 32
    status = await booted.wait_status(
        lambda s: abs(s["connectors"][0]["power_w"] - 3 * 230 * 10) < 100
    )
    assert status["connectors"][0]["status"] == "Charging"
    assert csms.errors == []


async def test_stop_transaction_data_stays_within_its_byte_budget(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """Every measurand (per phase) every second for 20 s: transactionData is thinned,
    never bigger than the budget (a CSMS may refuse big frames), still in time order,
    still from Transaction.Begin to Transaction.End."""
    from agent.chargepoint.metering import MAX_STOP_SAMPLE_BYTES

    everything = "Energy.Active.Import.Register,Power.Active.Import,Current.Import,Voltage"
    agent: RunningAgent = await make_agent(ocpp={"StopTxnSampledData": everything})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    await csms.wait_for(
        lambda: len([m for m in csms.messages("MeterValues") if m.get("transactionId")]) >= 20,
        timeout_s=40,
    )
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    data = (await csms.wait_message("StopTransaction", after=mark)).payload["transactionData"]
    middle = data[1:-1]
    assert middle and len(json.dumps(middle)) <= MAX_STOP_SAMPLE_BYTES
    assert len(middle) < 20  # thinned
    stamps = [mv["timestamp"] for mv in data]
    assert stamps == sorted(stamps)
    assert data[0]["sampledValue"][0]["context"] == "Transaction.Begin"
    assert data[-1]["sampledValue"][0]["context"] == "Transaction.End"
