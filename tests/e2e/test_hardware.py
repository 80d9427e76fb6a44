"""The agent's real drivers against the device simulators, with bad input on every wire."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, AgentFactory, RunningAgent, start_charging, status_is


def energy_values(payload: dict[str, Any]) -> list[float]:
    return [
        float(sv["value"])
        for mv in payload["meterValue"]
        for sv in mv["sampledValue"]
        if sv.get("measurand") == "Energy.Active.Import.Register"
    ]


async def test_garbage_on_the_controller_line_changes_nothing(
    booted: RunningAgent, csms: Csms
) -> None:
    tx_id = await start_charging(booted, csms)
    mark = len(csms.received)
    for _ in range(3):
        await booted.sim("rapi-garbage")
    mv = await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id,
                                 after=mark)  # fmt: skip
    assert energy_values(mv.payload)
    state = (await booted.sim("state"))["connectors"][0]
    assert state["controller_mode"] == "enabled"
    assert state["contactor_closed"]
    # No status change was invented from the noise: not even a Faulted that is taken back.
    with pytest.raises(TimeoutError):
        await csms.wait_message("StatusNotification", after=mark, timeout_s=2)
    assert csms.errors == []


async def test_controller_reset_mid_session_restores_the_limit(
    booted: RunningAgent, csms: Csms
) -> None:
    await start_charging(booted, csms)
    profile = {
        "chargingProfileId": 3, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10}]},
    }  # fmt: skip
    result = await csms.call(
        CP_ID, call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile)
    )
    assert result["status"] == "Accepted"
    await booted.wait_status(lambda s: s["connectors"][0]["offered_current_a"] == 10)
    await booted.sim("controller-reset")
    # The controller rebooted ($AB) with the current saved in its EEPROM (32 A: the agent
    # only sets volatile currents); the driver puts back the agent's 10 A.
    await wait_sim(booted, lambda s: s["offered_current_a"] == 10)
    assert csms.errors == []


async def test_meter_exception_is_reported_not_invented(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    tx_id = await start_charging(booted, csms)
    caplog.set_level(logging.WARNING)
    await booted.sim("meter-exception", code=4)
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"))
    faulted = [p for p in csms.messages("StatusNotification") if p["status"] == "Faulted"][-1]
    assert faulted["errorCode"] == "PowerMeterFailure"
    assert any("exception" in r.getMessage().lower() for r in caplog.records)
    before = len(csms.messages("MeterValues"))
    await booted.sim("meter-exception-clear")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    mark = len(csms.received)
    mv = await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id,
                                 after=mark)  # fmt: skip
    assert energy_values(mv.payload)
    # Every energy value sent is one the meter gave: they never go backwards.
    values = [v for p in csms.messages("MeterValues") for v in energy_values(p)]
    assert values == sorted(values)
    assert len(csms.messages("MeterValues")) > before
    assert csms.errors == []


async def test_meter_register_survives_an_agent_restart(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await start_charging(agent, csms)
    await agent.wait_status(lambda s: s["connectors"][0]["energy_wh"] > 1000)
    await agent.sim("ev-pause")
    status = await agent.wait_status(lambda s: s["connectors"][0]["power_w"] == 0)
    energy_before = status["connectors"][0]["energy_wh"]
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["reason"] == "PowerLoss"
    assert stop.payload["meterStop"] >= int(energy_before) - 1
    status = await agent.status()
    assert status["connectors"][0]["energy_wh"] >= energy_before - 1
    assert csms.errors == []


# ---------------------------------------------------------------------- never unmetered
async def test_a_pause_lost_to_a_line_glitch_is_sent_again(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RemoteStop while the controller's line is down for one command (the pause fails):
    the agent repeats the command until the contactor is open; no car charges outside a
    transaction."""
    from agent.chargepoint import station as station_module
    from drivers.base import DeviceTimeout
    from drivers.evse.rapi import RapiController

    monkeypatch.setattr(station_module, "CONTROLLER_RETRY_S", 0.5)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    failures = fail_once(monkeypatch, RapiController, "pause", DeviceTimeout("no reply to $FS"))
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await csms.wait_message("StopTransaction", after=mark)
    await wait_sim(agent, lambda s: not s["contactor_closed"])
    assert failures == []


async def test_a_lost_meter_pauses_the_energy_until_it_answers(
    booted: RunningAgent, csms: Csms
) -> None:
    """Nothing is delivered that nothing meters: the contactor opens while the meter is
    Faulted, the transaction stays, and charging resumes when the meter is back."""
    tx_id = await start_charging(booted, csms)
    await booted.sim("meter-exception", code=4)
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"))
    await wait_sim(booted, lambda s: not s["contactor_closed"])
    assert (await booted.status())["connectors"][0]["transaction_id"] == tx_id
    mark = len(csms.received)
    await booted.sim("meter-exception-clear")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    await wait_sim(booted, lambda s: s["contactor_closed"])


async def test_stopping_the_agent_opens_the_contactor(
    booted: RunningAgent, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orderly stop (SIGTERM) ends the session (closed as Reboot at the next start):
    the controller is paused first, so no energy flows that nobody bills."""
    from agent.hardware import SimProcess

    seen: dict[str, Any] = {}
    original = SimProcess.stop

    async def look_then_stop(self: SimProcess) -> None:
        seen.update((await self.command({"cmd": "state"}))["connectors"][0])
        await original(self)

    monkeypatch.setattr(SimProcess, "stop", look_then_stop)
    await start_charging(booted, csms)
    await booted.stop()
    assert seen and not seen["contactor_closed"], seen


def fail_once(monkeypatch: pytest.MonkeyPatch, cls: Any, name: str, error: Exception) -> list[Any]:
    """Make the driver method ``cls.name`` raise ``error`` once (a line glitch, a controller
    still booting), then work again. Returns the pending failures: empty once it fired."""
    original = getattr(cls, name)
    failures = [error]

    async def once(self: Any, *args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await original(self, *args)

    monkeypatch.setattr(cls, name, once)
    return failures


async def wait_sim(agent: RunningAgent, predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll the simulator's connector 1 until ``predicate(state)`` holds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        state = (await agent.sim("state"))["connectors"][0]
        if predicate(state):
            return
        assert loop.time() < deadline, state
        await asyncio.sleep(0.1)


async def test_an_unplug_during_a_serial_outage_still_ends_the_transaction(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller's serial line drops (a USB adapter reset) while a car charges, and
    the car leaves meanwhile. Once the line is back, FAULT (communication) -> absent is an
    unplug: the transaction ends with EVDisconnected."""
    import asyncio

    from drivers.evse.rapi import RapiController

    drivers: list[RapiController] = []
    original_start = RapiController.start

    async def keep(self: RapiController) -> None:
        drivers.append(self)
        await original_start(self)

    monkeypatch.setattr(RapiController, "start", keep)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    mark = len(csms.received)
    writer = drivers[0]._writer
    assert writer is not None
    writer.transport.close()  # end of file on the port
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"), after=mark)
    await agent.sim("unplug")
    await asyncio.sleep(0.3)
    await drivers[0].read_status()  # what the driver's next poll does: reopen, read
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert (stop.payload["transactionId"], stop.payload["reason"]) == (tx_id, "EVDisconnected")


async def test_a_current_the_controller_will_not_raise_is_not_repeated(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over temperature the controller keeps 10 A when asked for more: that is its
    decision. The agent takes it (and reports it) instead of repeating the command."""
    import asyncio

    from agent.chargepoint import station as station_module
    from drivers.base import CurrentNotApplied
    from drivers.evse.rapi import RapiController

    monkeypatch.setattr(station_module, "CONTROLLER_RETRY_S", 0.3)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await start_charging(agent, csms)
    # The start's own actuations (one runs when the CSMS's transaction id arrives) are over
    # before the controller starts refusing: a change of state is tried again, by design.
    while any(
        t.get_name() in ("tx-id-known", "actuate-all") and not t.done() for t in asyncio.all_tasks()
    ):
        await asyncio.sleep(0.01)
    asked: list[float] = []

    async def throttled(self: RapiController, current_a: float) -> float:
        asked.append(current_a)
        raise CurrentNotApplied("controller keeps 10 A", 10.0)

    monkeypatch.setattr(RapiController, "set_offered_current", throttled)
    body = {
        "chargingProfileId": 9,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}],
        },
    }
    result = await csms.call(
        CP_ID, call.SetChargingProfile(connector_id=1, cs_charging_profiles=body)
    )
    assert result["status"] == "Accepted"
    await agent.wait_status(lambda s: s["connectors"][0]["offered_current_a"] == 10.0)
    # Not repeated: nothing changes now, through six of the controller checks' retry periods
    # (an absence has no state to wait for).
    await asyncio.sleep(6 * station_module.CONTROLLER_RETRY_S)
    assert asked == [16]
    assert (await agent.status())["connectors"][0]["offered_current_a"] == 10.0


async def test_a_connector_whose_controller_never_started_is_faulted_not_available(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its EVSE controller has answered, a connector cannot charge: the CSMS sees it
    Faulted (InternalError), not Available, and a remote start is refused; once the
    controller answers, it is Available."""
    import asyncio

    from agent.chargepoint import station as station_module
    from drivers.base import DeviceTimeout
    from drivers.evse.rapi import RapiController

    monkeypatch.setattr(station_module, "CONTROLLER_RETRY_S", 0.3)
    original = RapiController.start
    booting = [True]

    async def start(self: Any) -> Any:
        if booting[0]:
            raise DeviceTimeout("no reply to $GV")
        return await original(self)

    monkeypatch.setattr(RapiController, "start", start)
    agent = await make_agent()
    faulted = await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    assert (faulted.payload["status"], faulted.payload["errorCode"]) == ("Faulted", "InternalError")
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="TAG", connector_id=1))
    assert result["status"] == "Rejected"
    mark = len(csms.received)
    booting[0] = False
    available = await csms.wait_message(
        "StatusNotification", lambda p: p["connectorId"] == 1, after=mark
    )
    assert (available.payload["status"], available.payload["errorCode"]) == ("Available", "NoError")
    await asyncio.sleep(0)
    assert (await agent.status())["connectors"][0]["controller_firmware"] is not None


async def test_a_controller_that_does_not_answer_at_start_is_started_later(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller is still booting when the agent starts (its first start fails): the
    agent starts it again a little later, and then charges under its supervision."""
    from agent.chargepoint import station as station_module
    from drivers.base import DeviceTimeout
    from drivers.evse.rapi import RapiController

    monkeypatch.setattr(station_module, "CONTROLLER_RETRY_S", 0.3)
    failures = fail_once(monkeypatch, RapiController, "start", DeviceTimeout("no reply to $GV"))
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Available")
    assert failures == []
    await start_charging(agent, csms)
    await wait_sim(agent, lambda s: s["contactor_closed"])


def with_cable_lock(monkeypatch: pytest.MonkeyPatch, opens: bool = True) -> list[float]:
    """Give the RAPI controller a cable lock (as a board with a lock driver has); returns
    the times (loop clock) it was told to open."""
    import asyncio
    import dataclasses

    from drivers.evse.rapi import RapiController

    original = RapiController.start
    opened: list[float] = []

    async def start(self: Any) -> Any:
        result = await original(self)
        self.capabilities = dataclasses.replace(self.capabilities, supports_unlock=True)
        return result

    async def unlock(self: Any) -> bool:
        opened.append(asyncio.get_running_loop().time())
        return opens

    monkeypatch.setattr(RapiController, "start", start)
    monkeypatch.setattr(RapiController, "unlock", unlock)
    return opened


async def test_unlock_connector_stops_the_transaction_then_opens_the_lock(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = with_cable_lock(monkeypatch)
    agent = await make_agent()
    tx_id = await start_charging(agent, csms)
    result = await csms.call(CP_ID, call.UnlockConnector(connector_id=1))
    assert result["status"] == "Unlocked"
    stop = await csms.wait_message("StopTransaction")
    assert (stop.payload["transactionId"], stop.payload["reason"]) == (tx_id, "UnlockCommand")
    assert len(opened) == 1


async def test_a_lock_that_stays_shut_is_reported_unlock_failed(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = with_cable_lock(monkeypatch, opens=False)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    result = await csms.call(CP_ID, call.UnlockConnector(connector_id=1))
    assert result["status"] == "UnlockFailed"
    assert len(opened) == 1
    assert agent.task is not None and not agent.task.done()


@pytest.mark.parametrize("unlock_on_disconnect", [True, False])
async def test_unplugging_the_ev_opens_the_cable_lock_when_configured(
    make_agent: AgentFactory,
    csms: Csms,
    monkeypatch: pytest.MonkeyPatch,
    unlock_on_disconnect: bool,
) -> None:
    """UnlockConnectorOnEVSideDisconnect: the cable came out of the car, so the charger
    lets go of it too -- or keeps it locked when the key is false."""
    import asyncio

    opened = with_cable_lock(monkeypatch)
    agent = await make_agent(ocpp={"UnlockConnectorOnEVSideDisconnect": unlock_on_disconnect})
    await start_charging(agent, csms)
    assert opened == []
    await agent.sim("unplug")
    stop = await csms.wait_message("StopTransaction")
    assert stop.payload["reason"] == "EVDisconnected"
    await asyncio.sleep(0.5)
    assert len(opened) == (1 if unlock_on_disconnect else 0)
