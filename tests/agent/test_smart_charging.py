"""Charging profiles: validation, stacking, recurrence, units (hand-worked cases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import smart_charging as sc

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)


def body(pid: int, purpose: str, stack: int, periods: list[tuple[int, float]], *,
         kind: str = "Absolute", start: datetime | None = T0, unit: str = "A",
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    schedule: dict[str, Any] = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if start is not None:
        schedule["startSchedule"] = start.isoformat()
    return {
        "chargingProfileId": pid,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }


def limit(profiles: list[sc.Profile], at: datetime, tx: sc.Tx | None = None) -> float:
    return sc.effective_limit_a(profiles, connector_id=1, now=at, tx=tx, hardware_max_a=32,
                                voltage_v=230, phases=3)  # fmt: skip


def test_no_profile_gives_the_hardware_maximum() -> None:
    assert limit([], T0) == 32


def test_highest_stack_level_wins_within_a_purpose() -> None:
    low = sc.parse_profile(1, body(1, sc.TX_DEFAULT, 0, [(0, 16)]))
    high = sc.parse_profile(1, body(2, sc.TX_DEFAULT, 1, [(0, 10), (3600, 20)]))
    assert limit([low, high], T0) == 10
    assert limit([low, high], T0 + timedelta(hours=1)) == 20


def test_tx_profile_overrides_default_and_cp_max_caps() -> None:
    default = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 6)]))
    tx_profile = sc.parse_profile(1, body(2, sc.TX, 0, [(0, 24)], kind="Relative", start=None))
    cp_max = sc.parse_profile(0, body(3, sc.CP_MAX, 0, [(0, 8)]))
    tx = sc.Tx(transaction_id=7, start=T0)
    assert limit([default, tx_profile], T0, tx) == 24
    assert limit([default, tx_profile], T0) == 6  # no transaction: the default holds
    assert limit([default, tx_profile, cp_max], T0, tx) == 8


def test_relative_profile_counts_from_transaction_start() -> None:
    p = sc.parse_profile(1, body(1, sc.TX, 0, [(0, 0), (600, 16)], kind="Relative", start=None))
    tx = sc.Tx(transaction_id=1, start=T0)
    assert limit([p], T0 + timedelta(minutes=5), tx) == 0
    assert limit([p], T0 + timedelta(minutes=11), tx) == 16
    assert sc.next_boundary([p], T0 + timedelta(minutes=5), T0) == T0 + timedelta(minutes=10)


def test_daily_recurring_profile_crosses_midnight() -> None:
    # 22:00-06:00 at 32 A, then 10 A for the rest of the day, every day.
    p = sc.parse_profile(
        0, body(1, sc.TX_DEFAULT, 0, [(0, 32), (8 * 3600, 10)], kind="Recurring",
                recurrencyKind="Daily"),
    )  # fmt: skip
    assert limit([p], T0 + timedelta(hours=3)) == 32  # 01:00 the next day
    assert limit([p], T0 + timedelta(hours=9)) == 10  # 07:00
    assert limit([p], T0 + timedelta(days=3, hours=1)) == 32


def test_watts_are_converted_with_voltage_and_phases() -> None:
    p = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 11040)], unit="W"))
    assert limit([p], T0) == pytest.approx(16.0)
    one_phase = sc.parse_profile(0, body(2, sc.TX_DEFAULT, 1, [(0, 2300)], unit="W"))
    one_phase = sc.parse_profile(
        0, {**one_phase.body, "chargingSchedule": {**one_phase.body["chargingSchedule"],
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 2300, "numberPhases": 1}]}},
    )  # fmt: skip
    assert limit([one_phase], T0) == pytest.approx(10.0)


def test_validity_window_and_duration() -> None:
    p = sc.parse_profile(
        0,
        body(1, sc.TX_DEFAULT, 0, [(0, 6)], validTo=(T0 + timedelta(hours=1)).isoformat()),
    )
    assert limit([p], T0 + timedelta(minutes=30)) == 6
    assert limit([p], T0 + timedelta(hours=2)) == 32
    q = sc.parse_profile(0, {**body(2, sc.TX_DEFAULT, 0, [(0, 6)])})
    q.body["chargingSchedule"]["duration"] = 60
    q = sc.parse_profile(0, q.body)
    assert limit([q], T0 + timedelta(seconds=59)) == 6
    assert limit([q], T0 + timedelta(seconds=61)) == 32


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (body(1, sc.TX, 0, [(10, 6)]), "startPeriod 0"),
        (body(1, sc.TX, 0, [(0, 6), (0, 8)]), "strictly increasing"),
        (body(1, sc.TX, 0, [(0, 6)], unit="kW"), "chargingRateUnit"),
        (body(1, "Bogus", 0, [(0, 6)]), "Purpose"),
        (body(1, sc.TX, 0, [(0, 6)], kind="Recurring"), "recurrencyKind"),
        (body(1, sc.TX_DEFAULT, 0, [(0, 6)], start=None), "startSchedule"),
        (body(1, sc.TX, 0, [(0, -1)]), "negative"),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(profile: dict[str, Any], message: str) -> None:
    with pytest.raises(sc.ProfileError, match=message):
        sc.parse_profile(1, profile)


period_lists = st.lists(
    st.tuples(st.integers(0, 86400), st.floats(0, 80, allow_nan=False)), min_size=1, max_size=6
).map(lambda ps: sorted({s: lim for s, lim in [(0, ps[0][1]), *ps]}.items()))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([sc.TX_DEFAULT, sc.CP_MAX]), st.integers(0, 3),
                       period_lists), min_size=1, max_size=5),
    st.integers(0, 2 * 86400),
)  # fmt: skip
def test_limit_never_exceeds_an_applicable_cap(
    specs: list[tuple[str, int, list[tuple[int, float]]]], offset_s: int
) -> None:
    # Installation replaces a profile of the same purpose and stack level: keep the last.
    unique = {(purpose, stack): periods for purpose, stack, periods in specs}
    profiles = [
        sc.parse_profile(0, body(i, purpose, stack, periods))
        for i, ((purpose, stack), periods) in enumerate(unique.items())
    ]
    at = T0 + timedelta(seconds=offset_s)
    result = limit(profiles, at)
    assert 0 <= result <= 32
    for purpose in (sc.CP_MAX, sc.TX_DEFAULT):
        active = [(p.stack_level, sc.period_at(p, at, None)) for p in profiles
                  if p.purpose == purpose]  # fmt: skip
        in_force = [(stack, period) for stack, period in active if period is not None]
        if in_force:
            assert result <= max(in_force, key=lambda sp: sp[0])[1].limit + 1e-9
    # Piecewise constant: nothing changes between now and the next boundary.
    edge = sc.next_boundary(profiles, at, None)
    if edge is not None and edge - at > timedelta(seconds=1):
        assert limit(profiles, edge - timedelta(seconds=1)) == result
