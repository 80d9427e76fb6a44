"""The sweep composite schedule (:func:`agent.core.smart_charging.composite`) gives exactly
what the reference (:func:`~agent.core.smart_charging.composite_by_sampling`, which re-stacks
every profile at every edge) gives: random profile sets, old and new, same output.

The sets include what an installed set never holds (equal stack levels in one group,
edges at fractions of a second, several connectors) so that the tie-breaking and rounding
rules are compared too; and a cut at ``max_periods``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import smart_charging as sc
from tests.agent.test_smart_charging import BASE, profile_bodies


@st.composite
def raw_sets(draw: st.DrawFn) -> list[sc.Profile]:
    """Profiles as drawn, duplicates of (purpose, stack level, connector) kept."""
    out: list[sc.Profile] = []
    for pid, (connector, raw) in enumerate(draw(st.lists(profile_bodies(), max_size=12))):
        body: dict[str, Any] = {**raw, "chargingProfileId": pid}
        if connector and draw(st.booleans()):
            connector = 2
        schedule = body["chargingSchedule"]
        if "startSchedule" in schedule and draw(st.booleans()):
            millis = draw(st.integers(1, 999))
            at = sc.parse_time(schedule["startSchedule"]) + timedelta(milliseconds=millis)
            body["chargingSchedule"] = {**schedule, "startSchedule": at.isoformat()}
        if body["chargingProfilePurpose"] == sc.TX and draw(st.booleans()):
            body["transactionId"] = draw(st.sampled_from([7, 8]))
        out.append(sc.parse_profile(connector, body))
    return out


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    raw_sets(),
    st.sampled_from([0, 1, 2]),
    st.one_of(st.none(), st.sampled_from([7, 8, None])),
    st.integers(-86400, 2 * 86400),
    st.integers(0, 7200),
    st.sampled_from([0, 1, 59, 3600, 86400, 86401, 3 * 86400]),
    st.sampled_from([1, 3]),
    st.sampled_from([16.0, 32.0]),
    st.one_of(st.none(), st.integers(1, 6)),
    st.integers(0, 999_999),
)
def test_the_sweep_gives_what_sampling_gives(
    profiles: list[sc.Profile],
    connector_id: int,
    tx_id: int | None,
    start_s: int,
    tx_age_s: int,
    duration_s: int,
    phases: int,
    hardware_a: float,
    max_periods: int | None,
    micros: int,
) -> None:
    start = BASE + timedelta(seconds=start_s, microseconds=micros)
    tx = sc.Tx(tx_id, start - timedelta(seconds=tx_age_s)) if tx_id is not None else None
    arguments: dict[str, Any] = {
        "connector_id": connector_id,
        "start": start,
        "duration_s": duration_s,
        "tx": tx,
        "hardware_max_a": hardware_a,
        "voltage_v": 230,
        "phases": phases,
        "max_periods": max_periods,
    }
    assert sc.composite(profiles, **arguments) == sc.composite_by_sampling(profiles, **arguments)


def staggered(count: int) -> list[sc.Profile]:
    """``count`` TxDefaultProfiles whose edges do not coincide, each in force for a while."""
    out = []
    for n in range(count):
        start = BASE + timedelta(seconds=97 * n)
        body = {
            "chargingProfileId": n,
            "stackLevel": n,
            "chargingProfilePurpose": sc.TX_DEFAULT,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "startSchedule": start.isoformat(),
                "duration": 3600 + 13 * n,
                "chargingSchedulePeriod": [
                    {"startPeriod": 600 * k + n, "limit": 6.0 + (n + k) % 20}
                    if k
                    else {"startPeriod": 0, "limit": 6.0 + n % 20}
                    for k in range(12)
                ],
            },
        }
        out.append(sc.parse_profile(1, body))
    return out


def test_the_sweep_matches_on_many_staggered_profiles() -> None:
    profiles = staggered(60)
    arguments: dict[str, Any] = {
        "connector_id": 1,
        "start": BASE,
        "duration_s": 2 * 86400,
        "tx": None,
        "hardware_max_a": 32,
        "voltage_v": 230,
        "phases": 3,
    }
    new = sc.composite(profiles, **arguments)
    assert new == sc.composite_by_sampling(profiles, **arguments)
    # Every profile shows: the schedule changes well over once per profile.
    assert len(new.periods) > 60


def test_a_recurrence_after_a_period_start_past_the_cycle() -> None:
    """Found by the property above: a Daily profile with a period starting after 24 h (never
    in force) must not hide the next cycle's own period starts."""
    body = {
        "chargingProfileId": 4,
        "stackLevel": 1,
        "chargingProfilePurpose": sc.CP_MAX,
        "chargingProfileKind": "Recurring",
        "recurrencyKind": "Daily",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "startSchedule": (BASE - timedelta(seconds=3)).isoformat(),
            "chargingSchedulePeriod": [
                {"startPeriod": 0, "limit": 0.0},
                {"startPeriod": 1, "limit": 0.1},
                {"startPeriod": 86402, "limit": 0.0},
            ],
        },
    }
    profiles = [sc.parse_profile(0, body)]
    arguments: dict[str, Any] = {
        "connector_id": 0, "start": BASE, "duration_s": 86400, "tx": None,
        "hardware_max_a": 16.0, "voltage_v": 230, "phases": 1,
    }  # fmt: skip
    periods = sc.composite(profiles, **arguments).periods
    assert [(p.start_s, p.limit_a) for p in periods] == [(0, 0.1), (86397, 0.0), (86398, 0.1)]
    assert sc.composite(profiles, **arguments) == sc.composite_by_sampling(profiles, **arguments)
