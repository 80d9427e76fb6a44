"""Smart Charging end to end: a CSMS over WSS shapes the charge, the simulated controller's
pilot follows, and StatusNotification and MeterValues say so.

The simulated charger: three phases at 230 V, 32 A hardware maximum, an EV that draws what
the pilot offers (up to 32 A per phase). Limits are sent as JSON decimals (``16.0``), which
the ``ocpp`` library hands over as ``Decimal``: the path a real CSMS takes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ocpp.exceptions import OCPPError
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from drivers.evse.rapi import RapiController
from tests.conftest import CP_ID, AgentFactory, RunningAgent, status_is

VOLTS, PHASES = 230, 3


def profile(
    pid: int,
    purpose: str,
    limits: list[tuple[int, float]] | float,
    *,
    stack: int = 0,
    kind: str = "Relative",
    unit: str = "A",
    start: datetime | None = None,
    duration: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A csChargingProfiles dict; ``limits`` is one limit or ``[(startPeriod, limit)]``."""
    periods = [(0, limits)] if isinstance(limits, int | float) else limits
    schedule: dict[str, Any] = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": float(v)} for s, v in periods],
    }
    if start is not None:
        schedule["startSchedule"] = start.isoformat(timespec="milliseconds")
    if duration is not None:
        schedule["duration"] = duration
    return {
        "chargingProfileId": pid,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }


def tx_profile(limit_a: float, pid: int = 1, **extra: Any) -> dict[str, Any]:
    return profile(pid, "TxProfile", limit_a, **extra)


def cp_max(limit_a: float, pid: int = 50) -> dict[str, Any]:
    return profile(
        pid,
        "ChargePointMaxProfile",
        limit_a,
        kind="Absolute",
        start=datetime.now(UTC) - timedelta(minutes=1),
    )


def tx_default(limit_a: float, pid: int = 20, stack: int = 0) -> dict[str, Any]:
    return profile(
        pid,
        "TxDefaultProfile",
        limit_a,
        stack=stack,
        kind="Absolute",
        start=datetime.now(UTC) - timedelta(minutes=1),
    )


async def set_profile(csms: Csms, connector: int, body: dict[str, Any]) -> str:
    result = await csms.call(
        CP_ID, call.SetChargingProfile(connector_id=connector, cs_charging_profiles=body)
    )
    return str(result["status"])


async def composite(
    csms: Csms, connector: int = 1, duration: int = 600, unit: str | None = None
) -> dict[str, Any]:
    return await csms.call(
        CP_ID,
        call.GetCompositeSchedule(
            connector_id=connector, duration=duration, charging_rate_unit=unit
        ),
    )


def limits_of(result: dict[str, Any]) -> list[tuple[int, float]]:
    periods = result["chargingSchedule"]["chargingSchedulePeriod"]
    return [(p["startPeriod"], p["limit"]) for p in periods]


async def sim_state(agent: RunningAgent, connector: int = 1) -> dict[str, Any]:
    state = await agent.sim("state")
    found: dict[str, Any] = state["connectors"][connector - 1]
    return found


async def wait_sim(
    agent: RunningAgent,
    predicate: Callable[[dict[str, Any]], bool],
    connector: int = 1,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Poll the simulator until ``predicate(connector state)`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await sim_state(agent, connector)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"simulator never matched; last: {state}")
        await asyncio.sleep(0.02)


def offering(amps: float) -> Callable[[dict[str, Any]], bool]:
    """The pilot is on and offers ``amps``."""
    return lambda s: s["pilot_on"] and s["offered_current_a"] == amps


def paused(state: dict[str, Any]) -> bool:
    return state["controller_mode"] == "sleeping" and not state["pilot_on"]


async def start_charging(
    agent: RunningAgent, csms: Csms, connector: int = 1, tag: str = "SMART-1", **extra: Any
) -> int:
    """Plug, remote start, wait for Charging; return the CSMS transaction id."""
    mark = len(csms.received)
    await agent.sim("plug", connector)
    result = await csms.call(
        CP_ID, call.RemoteStartTransaction(id_tag=tag, connector_id=connector, **extra)
    )
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(connector, "Charging"), after=mark)
    status = await agent.wait_status(
        lambda s: s["connectors"][connector - 1]["transaction_id"] is not None
    )
    return int(status["connectors"][connector - 1]["transaction_id"])


def measurands(payload: dict[str, Any]) -> dict[str, float]:
    """Phase-less sampled values of a MeterValues, by measurand."""
    return {
        sv["measurand"]: float(sv["value"])
        for mv in payload["meterValue"]
        for sv in mv["sampledValue"]
        if "phase" not in sv
    }


def meter_values(
    offered_a: float, power_w: float, connector: int = 1
) -> Callable[[dict[str, Any]], bool]:
    """A MeterValues with Current.Offered ``offered_a`` and power ``power_w`` (±2 %)."""

    def match(payload: dict[str, Any]) -> bool:
        values = measurands(payload)
        return (
            payload["connectorId"] == connector
            and values.get("Current.Offered") == offered_a
            and abs(values.get("Power.Active.Import", -1e9) - power_w) <= 0.02 * power_w + 1
        )

    return match


async def offered_in_status(agent: RunningAgent, amps: float, connector: int = 1) -> None:
    await agent.wait_status(lambda s: s["connectors"][connector - 1]["offered_current_a"] == amps)


async def evcp_status_json(agent: RunningAgent) -> dict[str, Any]:
    """Run ``evcp status --config FILE --json`` as a user would, in another process."""
    command = [sys.executable, "-m", "agent", "status", "--config", str(agent.config), "--json"]
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ---------------------------------------------------------------------- ev.energy pattern
@pytest.mark.parametrize("kind", ["Absolute", "Relative"])
async def test_a_charge_point_max_profile_without_a_start_switches_off_and_on_from_now(
    booted: RunningAgent, csms: Csms, kind: str
) -> None:
    """A ChargePointMaxProfile with no startSchedule (Absolute) or Relative has no
    transaction to count from: it starts when received, so a CSMS that switches the
    charger off and on with it is obeyed (it used to be Rejected, leaving it on)."""
    await start_charging(booted, csms)
    await wait_sim(booted, offering(32))
    mark = len(csms.received)
    off = profile(60, "ChargePointMaxProfile", 0, kind=kind, start=None)
    assert await set_profile(csms, 0, off) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "SuspendedEVSE"), after=mark)
    await wait_sim(booted, paused)
    mark = len(csms.received)
    on = profile(60, "ChargePointMaxProfile", 16, kind=kind, start=None)
    assert await set_profile(csms, 0, on) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    await wait_sim(booted, offering(16))


async def test_ev_energy_pattern_pause_resume_and_cap(booted: RunningAgent, csms: Csms) -> None:
    """TxProfile 0 A pauses, 16 A resumes, a ChargePointMaxProfile of 8 A caps the 16 A:
    seen on the pilot, in StatusNotification, in MeterValues and in ``evcp status``."""
    tx_id = await start_charging(booted, csms)
    await wait_sim(booted, offering(32))

    mark = len(csms.received)
    assert await set_profile(csms, 1, tx_profile(0, transactionId=tx_id)) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "SuspendedEVSE"), after=mark)
    state = await wait_sim(booted, paused)
    assert not state["contactor_closed"] and state["power_w"] == 0
    await csms.wait_message("MeterValues", meter_values(0.0, 0.0), after=mark)
    await offered_in_status(booted, 0.0)

    mark = len(csms.received)
    assert await set_profile(csms, 1, tx_profile(16, transactionId=tx_id)) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    state = await wait_sim(booted, offering(16))
    assert state["controller_mode"] == "enabled" and state["contactor_closed"]
    await csms.wait_message("MeterValues", meter_values(16.0, 16 * VOLTS * PHASES), after=mark)
    await offered_in_status(booted, 16.0)

    mark = len(csms.received)
    assert await set_profile(csms, 0, cp_max(8)) == "Accepted"
    await wait_sim(booted, offering(8))
    await csms.wait_message("MeterValues", meter_values(8.0, 8 * VOLTS * PHASES), after=mark)
    status = await evcp_status_json(booted)  # what `evcp status --json` prints
    assert status["connectors"][0]["offered_current_a"] == 8
    assert status["connectors"][0]["limit_a"] == 8
    # Still charging: the cap changed the current, not the state.
    assert [
        r.payload["status"] for r in csms.received[mark:] if r.action == "StatusNotification"
    ] == []
    assert limits_of(await composite(csms, 1)) == [(0, 8.0)]
    assert limits_of(await composite(csms, 0)) == [(0, 8.0)]
    assert csms.errors == []


async def test_limit_in_watts_and_decimal_amps(booted: RunningAgent, csms: Csms) -> None:
    await start_charging(booted, csms)
    assert await set_profile(csms, 1, tx_profile(6900, unit="W")) == "Accepted"  # 10 A
    await wait_sim(booted, offering(10))
    assert await set_profile(csms, 1, tx_profile(12.7)) == "Accepted"  # the pilot takes 12 A
    await wait_sim(booted, offering(12))
    status = await booted.status()
    assert status["connectors"][0]["limit_a"] == pytest.approx(12.7)
    assert status["connectors"][0]["offered_current_a"] == 12
    assert csms.errors == []


# ---------------------------------------------------------------------- period boundaries
async def test_period_boundaries_are_applied_on_time(booted: RunningAgent, csms: Csms) -> None:
    """An Absolute TxProfile: 16 A now, 8 A 2 s later, 0 A 4 s later (a timer, no poll)."""
    await start_charging(booted, csms)
    start = datetime.now(UTC)
    body = profile(2, "TxProfile", [(0, 16), (2, 8), (4, 0)], kind="Absolute", start=start)
    mark = len(csms.received)
    assert await set_profile(csms, 1, body) == "Accepted"
    await wait_sim(booted, offering(16))
    await wait_sim(booted, offering(8), timeout_s=5)
    elapsed = (datetime.now(UTC) - start).total_seconds()
    assert elapsed >= 1.95, elapsed  # not early (the wait's timeout catches a missed one)
    await wait_sim(booted, paused, timeout_s=5)
    elapsed = (datetime.now(UTC) - start).total_seconds()
    assert elapsed >= 3.95, elapsed
    await csms.wait_message("StatusNotification", status_is(1, "SuspendedEVSE"), after=mark)
    assert csms.errors == []


# ---------------------------------------------------------------------- between sessions
async def test_limit_set_between_sessions_holds_from_the_first_second(
    booted: RunningAgent, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TxDefaultProfile set while idle: the controller gets the current before it is
    enabled, so the EV never sees more, and the first MeterValues already says so."""
    commands: list[tuple[str, float | None]] = []
    original_set = RapiController.set_offered_current
    original_enable = RapiController.enable

    async def set_offered_current(self: RapiController, current_a: float) -> float:
        commands.append(("current", current_a))
        return await original_set(self, current_a)

    async def enable(self: RapiController) -> None:
        commands.append(("enable", None))
        await original_enable(self)

    monkeypatch.setattr(RapiController, "set_offered_current", set_offered_current)
    monkeypatch.setattr(RapiController, "enable", enable)

    for limit_a in (10.0, 13.0):
        assert await set_profile(csms, 0, tx_default(limit_a)) == "Accepted"
        status = await booted.status()
        assert status["connectors"][0]["limit_a"] == limit_a
        assert status["connectors"][0]["offered_current_a"] == 0  # no session, pilot off
        commands.clear()
        mark = len(csms.received)
        tx_id = await start_charging(booted, csms, tag=f"NEXT-{int(limit_a)}")
        assert commands[:2] == [("current", limit_a), ("enable", None)], commands
        assert all(amps is None or amps == limit_a for _, amps in commands)
        await wait_sim(booted, offering(limit_a))
        first = await csms.wait_message(
            "MeterValues", lambda p, t=tx_id: p.get("transactionId") == t, after=mark
        )
        assert measurands(first.payload)["Current.Offered"] == limit_a
        result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
        assert result["status"] == "Accepted"
        await csms.wait_message("StopTransaction", after=mark)
        await booted.sim("unplug")
        await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert csms.errors == []


async def test_remote_start_carries_a_tx_profile(booted: RunningAgent, csms: Csms) -> None:
    # Refused when the profile would be refused (stack level beyond the maximum)...
    await booted.sim("plug")
    result = await csms.call(
        CP_ID,
        call.RemoteStartTransaction(
            id_tag="RS-1", connector_id=1, charging_profile=tx_profile(12, stack=11)
        ),
    )
    assert result["status"] == "Rejected"
    # ...applied from the first second otherwise.
    tx_id = await start_charging(booted, csms, tag="RS-2", charging_profile=tx_profile(12))
    await wait_sim(booted, offering(12))
    assert limits_of(await composite(csms, 1)) == [(0, 12.0)]
    # It ends with the transaction.
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await csms.wait_message("StopTransaction", after=mark)
    await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is None)
    assert limits_of(await composite(csms, 1)) == [(0, 32.0)]
    assert csms.errors == []


# ---------------------------------------------------------------------- bad input
async def test_bad_profiles_are_rejected_and_change_nothing(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent(
        ocpp={
            "ChargingScheduleAllowedChargingRateUnit": "Current",
            "MaxChargingProfilesInstalled": 3,
        }
    )
    await csms.wait_message("StatusNotification", status_is(1, "Available"))
    # A TxProfile without a transaction.
    assert await set_profile(csms, 1, tx_profile(6)) == "Rejected"
    assert limits_of(await composite(csms, 1)) == [(0, 32.0)]

    tx_id = await start_charging(agent, csms)
    assert await set_profile(csms, 0, tx_default(10)) == "Accepted"
    assert await set_profile(csms, 1, tx_profile(11, pid=2)) == "Accepted"
    await wait_sim(agent, offering(11))
    before = limits_of(await composite(csms, 1))
    assert before == [(0, 11.0)]

    bad: list[tuple[int, dict[str, Any]]] = [
        (1, tx_profile(6, pid=3, stack=11)),  # beyond ChargeProfileMaxStackLevel (10)
        (1, profile(3, "TxProfile", [(i * 60, 6) for i in range(49)])),  # > 48 periods
        (1, profile(3, "TxProfile", [(0, 6), (120, 7), (60, 8)])),  # not increasing
        (1, profile(3, "TxProfile", [(0, 6), (60, 7), (60, 8)])),  # not increasing
        (1, tx_profile(4140, pid=3, unit="W")),  # W not in ChargingScheduleAllowedChargingRateUnit
        (1, tx_profile(6, pid=3, stack=1, transactionId=tx_id + 1)),  # not this transaction
        (0, tx_profile(6, pid=3, stack=1)),  # a TxProfile on connector 0
        (1, profile(3, "ChargePointMaxProfile", 6, kind="Absolute", start=datetime.now(UTC))),
        (2, tx_profile(6, pid=3, stack=1)),  # no connector 2
        (1, tx_profile(6, pid=3, stack=1)),  # a 4th profile: MaxChargingProfilesInstalled
    ]
    assert await set_profile(csms, 0, cp_max(30, pid=4)) == "Accepted"  # the 3rd profile
    for connector, body in bad:
        assert await set_profile(csms, connector, body) == "Rejected", body
        assert limits_of(await composite(csms, 1)) == before
        assert (await sim_state(agent))["offered_current_a"] == 11
    # An unknown unit breaks the schema: a CALLERROR, and still nothing installed.
    with pytest.raises(OCPPError) as error:
        await csms._cps[CP_ID].call(
            call.SetChargingProfile(
                connector_id=1, cs_charging_profiles=tx_profile(6, pid=3, unit="kW")
            ),
            suppress=False,
            skip_schema_validation=True,
        )
    assert error.value.code == "FormationViolation"
    assert limits_of(await composite(csms, 1)) == before
    status = await agent.status()
    assert status["connectors"][0]["limit_a"] == 11
    assert status["connectors"][0]["offered_current_a"] == 11
    # The right profile still goes in (replacing profile 2 by id).
    assert await set_profile(csms, 1, tx_profile(9, pid=2)) == "Accepted"
    await wait_sim(agent, offering(9))
    assert csms.errors == []


# ---------------------------------------------------------------------- clear
async def test_clear_charging_profile(booted: RunningAgent, csms: Csms) -> None:
    await start_charging(booted, csms)
    assert await set_profile(csms, 0, tx_default(20, pid=1)) == "Accepted"
    assert await set_profile(csms, 0, tx_default(18, pid=2, stack=1)) == "Accepted"
    assert await set_profile(csms, 1, tx_profile(10, pid=3, stack=2)) == "Accepted"
    assert await set_profile(csms, 0, cp_max(14, pid=4)) == "Accepted"
    await wait_sim(booted, offering(10))

    async def clear(**criteria: Any) -> str:
        result = await csms.call(CP_ID, call.ClearChargingProfile(**criteria))
        return str(result["status"])

    assert await clear(id=99) == "Unknown"
    assert await clear(connector_id=1, charging_profile_purpose="ChargePointMaxProfile") == (
        "Unknown"
    )
    assert await clear(id=3) == "Accepted"  # the TxProfile: back to the TxDefaultProfile
    await wait_sim(booted, offering(14))  # 18 A, capped by the ChargePointMaxProfile
    assert await clear(charging_profile_purpose="ChargePointMaxProfile") == "Accepted"
    await wait_sim(booted, offering(18))
    assert await clear(connector_id=0, stack_level=1) == "Accepted"
    await wait_sim(booted, offering(20))
    assert await clear() == "Accepted"
    await wait_sim(booted, offering(32))
    assert await clear() == "Unknown"
    assert csms.errors == []


# ---------------------------------------------------------------------- composite
async def test_get_composite_schedule(booted: RunningAgent, csms: Csms) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    body = profile(
        1,
        "TxDefaultProfile",
        [(0, 10), (600, 16.5), (7200, 0)],
        kind="Absolute",
        start=now,
        duration=10800,
    )
    assert await set_profile(csms, 1, body) == "Accepted"
    assert await set_profile(csms, 0, cp_max(16)) == "Accepted"
    result = await composite(csms, 1, duration=3600)
    assert result["status"] == "Accepted" and result["connectorId"] == 1
    schedule = result["chargingSchedule"]
    assert schedule["duration"] == 3600 and schedule["chargingRateUnit"] == "A"
    assert result["scheduleStart"] == schedule["startSchedule"]
    shift = (datetime.fromisoformat(result["scheduleStart"]) - now).total_seconds()
    assert 0 <= shift <= 2
    assert limits_of(result) == [(0, 10.0), (600 - int(shift), 16.0)]
    assert all(p["numberPhases"] == 3 for p in schedule["chargingSchedulePeriod"])
    # Periods within the duration only; the W view; the charge point's own (connector 0).
    assert limits_of(await composite(csms, 1, duration=300)) == [(0, 10.0)]
    in_w = await composite(csms, 1, duration=4 * 3600, unit="W")
    assert in_w["chargingSchedule"]["chargingRateUnit"] == "W"
    assert [lim for _, lim in limits_of(in_w)] == [6900.0, 11040.0, 0.0, 11040.0]
    assert limits_of(await composite(csms, 0, duration=3600)) == [(0, 16.0)]
    assert (await composite(csms, 5))["status"] == "Rejected"
    assert csms.errors == []


# ---------------------------------------------------------------------- restart
async def test_profiles_survive_a_restart_but_tx_profiles_do_not(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent()
    await csms.wait_message("StatusNotification", status_is(1, "Available"))
    assert await set_profile(csms, 0, tx_default(10)) == "Accepted"
    assert await set_profile(csms, 0, cp_max(8.5)) == "Accepted"
    await start_charging(agent, csms)
    assert await set_profile(csms, 1, tx_profile(6.0, pid=7, stack=3)) == "Accepted"
    await wait_sim(agent, offering(6))

    await agent.stop()  # the transaction is cut (PowerLoss at the next start)
    mark = len(csms.received)
    await agent.start()
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=mark)
    status = await agent.status()
    assert status["connectors"][0]["limit_a"] == 8.5
    assert limits_of(await composite(csms, 1)) == [(0, 8.5)]
    # A new session: the stored TxDefaultProfile and ChargePointMaxProfile apply at once,
    # the old session's TxProfile (6 A) does not.
    await start_charging(agent, csms, tag="AFTER")
    await wait_sim(agent, offering(8))
    await asyncio.sleep(0.3)
    assert (await sim_state(agent))["offered_current_a"] == 8
    assert csms.errors == []


# ---------------------------------------------------------------------- two connectors
async def test_charge_point_maximum_is_shared_between_connectors(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent(connectors=2)
    for connector in (1, 2):
        await csms.wait_message("StatusNotification", status_is(connector, "Available"))
    assert await set_profile(csms, 0, cp_max(20)) == "Accepted"
    first = await start_charging(agent, csms, connector=1, tag="LEFT")
    await wait_sim(agent, offering(20), connector=1)
    await start_charging(agent, csms, connector=2, tag="RIGHT")
    await wait_sim(agent, offering(10), connector=1)
    await wait_sim(agent, offering(10), connector=2)
    # One session limited to 6 A by its own profile leaves 14 A to the other.
    assert await set_profile(csms, 2, tx_profile(6)) == "Accepted"
    await wait_sim(agent, offering(6), connector=2)
    await wait_sim(agent, offering(14), connector=1)
    # Too little for two: the later session waits, the first one charges.
    assert await set_profile(csms, 0, cp_max(11)) == "Accepted"
    await wait_sim(agent, offering(11), connector=1)
    await wait_sim(agent, paused, connector=2)
    assert await set_profile(csms, 0, cp_max(20)) == "Accepted"
    await wait_sim(agent, offering(6), connector=2)
    # The first session ends: the other may have it all (its own profile: 6 A).
    mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=first))
    await csms.wait_message("StopTransaction", after=mark)
    await csms.call(CP_ID, call.ClearChargingProfile(charging_profile_purpose="TxProfile"))
    await wait_sim(agent, offering(20), connector=2)
    assert csms.errors == []


async def test_a_composite_schedule_is_at_most_a_week(booted: RunningAgent, csms: Csms) -> None:
    """GetCompositeSchedule is computed on the agent's event loop: a year (or 2**31 s) of
    daily profiles would hold it for minutes, so the answer covers at most 7 days."""
    result = await composite(csms, duration=2**31 - 1)
    assert result["status"] == "Accepted"
    assert result["chargingSchedule"]["duration"] <= 7 * 86400
