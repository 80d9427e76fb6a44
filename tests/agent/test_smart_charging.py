"""Charging profiles: validation, stacking, recurrence, units and the composite schedule.

Hand-worked cases (OCPP 1.6 section 3.13: stacking, combining purposes, the example data
structure; midnight; daylight-saving changes; W to A; limits below 6 A), the installation
rules of :class:`agent.features.smart_charging.profiles.ChargingProfiles` (keys, replacement, clearing, persistence)
and property-based checks of the composite schedule.

The installation in these tests: 32 A hardware maximum, 230 V, 3 phases (690 W per A).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import smart_charging as sc
from agent.features.registry import ConfigKeys
from agent.features.smart_charging.profiles import MAX_COMPOSITE_PERIODS, ChargingProfiles
from agent.store import Store

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
LONDON = ZoneInfo("Europe/London")
HOUR = 3600


def body(
    pid: int,
    purpose: str,
    stack: int,
    periods: Sequence[tuple[int, float | Decimal]],
    *,
    kind: str = "Absolute",
    start: datetime | None = T0,
    unit: str = "A",
    phases: int | None = None,
    duration: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A csChargingProfiles dict (camelCase, as the adapter hands it to the station)."""
    period_list: list[dict[str, Any]] = []
    for s, lim in periods:
        period: dict[str, Any] = {"startPeriod": s, "limit": lim}
        if phases is not None:
            period["numberPhases"] = phases
        period_list.append(period)
    schedule: dict[str, Any] = {"chargingRateUnit": unit, "chargingSchedulePeriod": period_list}
    if start is not None:
        schedule["startSchedule"] = start.isoformat()
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


def limit(
    profiles: list[sc.Profile], at: datetime, tx: sc.Tx | None = None, connector_id: int = 1
) -> float:
    return sc.effective_limit_a(
        profiles,
        connector_id=connector_id,
        now=at,
        tx=tx,
        hardware_max_a=32,
        voltage_v=230,
        phases=3,
    )


def composite(
    profiles: list[sc.Profile],
    start: datetime,
    duration_s: int,
    tx: sc.Tx | None = None,
    connector_id: int = 1,
    phases: int = 3,
) -> list[tuple[int, float]]:
    """``[(startPeriod, limit A rounded down to 0.1)]``."""
    periods = sc.composite(
        profiles,
        connector_id=connector_id,
        start=start,
        duration_s=duration_s,
        tx=tx,
        hardware_max_a=32,
        voltage_v=230,
        phases=phases,
    )
    assert periods.duration_s == duration_s
    return [(p.start_s, sc.floor_tenth(p.limit_a)) for p in periods.periods]


# ============================================================================ basics


def test_no_profile_gives_the_hardware_maximum() -> None:
    assert limit([], T0) == 32
    assert composite([], T0, 86400) == [(0, 32.0)]


def test_highest_stack_level_wins_within_a_purpose() -> None:
    low = sc.parse_profile(1, body(1, sc.TX_DEFAULT, 0, [(0, 16)]))
    high = sc.parse_profile(1, body(2, sc.TX_DEFAULT, 1, [(0, 10), (3600, 20)]))
    assert limit([low, high], T0) == 10
    assert limit([low, high], T0 + timedelta(hours=1)) == 20
    # The order of installation does not matter.
    assert limit([high, low], T0) == 10


def test_tx_profile_overrides_default_and_cp_max_caps() -> None:
    default = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 6)]))
    tx_profile = sc.parse_profile(1, body(2, sc.TX, 0, [(0, 24)], kind="Relative", start=None))
    cp_max = sc.parse_profile(0, body(3, sc.CP_MAX, 0, [(0, 8)]))
    tx = sc.Tx(transaction_id=7, start=T0)
    assert limit([default, tx_profile], T0, tx) == 24
    assert limit([default, tx_profile], T0) == 6  # no transaction: the default holds
    assert limit([default, tx_profile, cp_max], T0, tx) == 8


def test_tx_profile_of_another_transaction_does_not_apply() -> None:
    other = sc.parse_profile(
        1, body(1, sc.TX, 0, [(0, 10)], start=None, kind="Relative", transactionId=41)
    )
    assert limit([other], T0, sc.Tx(42, T0)) == 32
    assert limit([other], T0, sc.Tx(41, T0)) == 10


def test_connector_default_overrides_connector_zero_default_whatever_the_stack_level() -> None:
    everywhere = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 5, [(0, 10)]))
    here = sc.parse_profile(1, body(2, sc.TX_DEFAULT, 0, [(0, 20)], duration=HOUR))
    assert limit([everywhere, here], T0) == 20
    assert limit([everywhere, here], T0, connector_id=2) == 10
    # Once the connector's own profile has ended, connector 0's applies again.
    assert limit([everywhere, here], T0 + timedelta(hours=1)) == 10


def test_relative_profile_counts_from_transaction_start() -> None:
    p = sc.parse_profile(1, body(1, sc.TX, 0, [(0, 0), (600, 16)], kind="Relative", start=None))
    tx = sc.Tx(transaction_id=1, start=T0)
    assert limit([p], T0 + timedelta(minutes=5), tx) == 0
    assert limit([p], T0 + timedelta(minutes=11), tx) == 16
    assert sc.next_boundary([p], T0 + timedelta(minutes=5), T0) == T0 + timedelta(minutes=10)


def test_relative_default_applies_only_during_a_transaction() -> None:
    p = sc.parse_profile(
        0, body(1, sc.TX_DEFAULT, 0, [(0, 8), (HOUR, 16)], kind="Relative", start=None)
    )
    assert limit([p], T0) == 32
    tx = sc.Tx(None, T0 - timedelta(minutes=30))
    assert limit([p], T0, tx) == 8
    assert limit([p], T0 + timedelta(minutes=30), tx) == 16
    # GetCompositeSchedule without a transaction: as if one started at the schedule start.
    assert composite([p], T0, 2 * HOUR) == [(0, 8.0), (HOUR, 16.0)]
    assert composite([p], T0, 2 * HOUR, tx) == [(0, 8.0), (1800, 16.0)]


def test_daily_recurring_profile_crosses_midnight() -> None:
    # 22:00-06:00 at 32 A, then 10 A for the rest of the day, every day.
    p = sc.parse_profile(
        0,
        body(
            1, sc.TX_DEFAULT, 0, [(0, 32), (8 * 3600, 10)], kind="Recurring", recurrencyKind="Daily"
        ),
    )
    assert limit([p], T0 + timedelta(hours=3)) == 32  # 01:00 the next day
    assert limit([p], T0 + timedelta(hours=9)) == 10  # 07:00
    assert limit([p], T0 + timedelta(days=3, hours=1)) == 32
    assert limit([p], T0 - timedelta(hours=1)) == 32  # before the first cycle: no limit
    # From 20:00 for 24 h: no limit until 22:00 (the first cycle), 10 A from 06:00.
    assert composite([p], T0 - timedelta(hours=2), 86400) == [(0, 32.0), (10 * HOUR, 10.0)]
    # From 07:00 for 24 h: 10 A until 22:00, 32 A overnight, 10 A again from 06:00.
    assert composite([p], T0 + timedelta(hours=9), 86400) == [
        (0, 10.0),
        (15 * HOUR, 32.0),
        (23 * HOUR, 10.0),
    ]


def test_absolute_profile_crossing_midnight_with_duration() -> None:
    # 23:30 to 01:30 at 12 A, 6.5 A in the second hour; nothing before or after.
    start = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    p = sc.parse_profile(
        0, body(1, sc.TX_DEFAULT, 0, [(0, 12), (HOUR, 6.5)], start=start, duration=2 * HOUR)
    )
    assert composite([p], datetime(2026, 12, 31, 22, 0, tzinfo=UTC), 6 * HOUR) == [
        (0, 32.0),
        (5400, 12.0),
        (9000, 6.5),
        (12600, 32.0),
    ]
    assert limit([p], datetime(2027, 1, 1, 0, 29, 59, tzinfo=UTC)) == 12
    assert limit([p], datetime(2027, 1, 1, 0, 30, tzinfo=UTC)) == 6.5
    assert limit([p], datetime(2027, 1, 1, 1, 30, tzinfo=UTC)) == 32


def test_weekly_recurrence() -> None:
    monday = datetime(2026, 1, 5, tzinfo=UTC)
    # Weekdays 07:00-19:00 at 10 A (five 24 h days written out), weekend open.
    periods: list[tuple[int, float]] = []
    for day in range(5):
        periods += [(day * 86400, 32), (day * 86400 + 7 * HOUR, 10), (day * 86400 + 19 * HOUR, 32)]
    p = sc.parse_profile(
        0,
        body(1, sc.TX_DEFAULT, 0, periods, start=monday, kind="Recurring", recurrencyKind="Weekly"),
    )
    assert limit([p], monday + timedelta(days=7, hours=8)) == 10  # next Monday 08:00
    assert limit([p], monday + timedelta(days=12, hours=8)) == 32  # Saturday
    assert limit([p], monday + timedelta(days=18, hours=18)) == 10  # the Friday after


# ============================================================================ OCPP 1.6 section 3.13


def test_spec_example_daily_profile_in_watts() -> None:
    """Section 3.13.4's data structure: a Daily TxDefaultProfile of 11 kW from 00:00, 6 kW
    from 08:00 and 11 kW again from 20:00, three phases."""
    p = sc.parse_profile(
        0,
        body(
            100,
            sc.TX_DEFAULT,
            0,
            [(0, 11000), (28800, 6000), (72000, 11000)],
            kind="Recurring",
            recurrencyKind="Daily",
            unit="W",
            phases=3,
            start=datetime(2013, 1, 1, tzinfo=UTC),
            duration=86400,
        ),
    )
    day = datetime(2026, 6, 1, tzinfo=UTC)
    assert limit([p], day + timedelta(hours=7)) == pytest.approx(11000 / 690)
    assert limit([p], day + timedelta(hours=12)) == pytest.approx(6000 / 690)
    assert composite([p], day, 86400) == [(0, 15.9), (28800, 8.6), (72000, 15.9)]


def test_spec_stacking_an_exception_over_a_base_profile() -> None:
    """Section 3.13.2: a stack-level-0 profile for every day and, on top of it, a
    stack-level-1 profile valid for one day only (a holiday at the full 32 A)."""
    base_start = datetime(2026, 1, 1, tzinfo=UTC)
    base = sc.parse_profile(
        0,
        body(
            1,
            sc.TX_DEFAULT,
            0,
            [(0, 32), (7 * HOUR, 16), (23 * HOUR, 32)],
            kind="Recurring",
            recurrencyKind="Daily",
            start=base_start,
        ),
    )
    holiday = sc.parse_profile(
        0,
        body(
            2,
            sc.TX_DEFAULT,
            1,
            [(0, 25)],
            start=base_start,
            validFrom="2026-01-06T00:00:00Z",
            validTo="2026-01-07T00:00:00Z",
        ),
    )
    start = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    assert composite([base, holiday], start, 2 * 86400) == [
        (0, 16.0),  # Jan 5 12:00: base
        (11 * HOUR, 32.0),  # Jan 5 23:00
        (12 * HOUR, 25.0),  # Jan 6 00:00: the holiday profile is valid
        (36 * HOUR, 32.0),  # Jan 7 00:00: the base again (its night period)
        (43 * HOUR, 16.0),  # Jan 7 07:00
    ]


def test_spec_combining_purposes() -> None:
    """Section 3.13.3: TxDefaultProfile, a TxProfile that overrides it for the transaction,
    and a ChargePointMaxProfile that caps both."""
    start = datetime(2026, 5, 4, 17, 0, tzinfo=UTC)
    cp_max = sc.parse_profile(
        0,
        body(
            1,
            sc.CP_MAX,
            0,
            [(0, 20)],
            start=datetime(2026, 5, 4, 18, 0, tzinfo=UTC),
            duration=4 * HOUR,
        ),
    )
    default = sc.parse_profile(0, body(2, sc.TX_DEFAULT, 0, [(0, 16)], start=start))
    tx_profile = sc.parse_profile(
        1, body(3, sc.TX, 0, [(0, 0), (1800, 32)], kind="Relative", start=None)
    )
    tx = sc.Tx(None, start)
    assert composite([cp_max, default, tx_profile], start, 8 * HOUR, tx) == [
        (0, 0.0),  # the TxProfile pauses the first half hour
        (1800, 32.0),  # then allows 32 A, above the TxDefaultProfile's 16 A
        (HOUR, 20.0),  # 18:00-22:00 the ChargePointMaxProfile caps it
        (5 * HOUR, 32.0),
    ]
    # Without the transaction: the TxDefaultProfile, capped.
    assert composite([cp_max, default, tx_profile], start, 8 * HOUR) == [(0, 16.0)]
    # Connector 0: the charge point's limit, the hardware maximum capped by ChargePointMax.
    assert composite([cp_max, default, tx_profile], start, 8 * HOUR, tx, connector_id=0) == [
        (0, 32.0),
        (HOUR, 20.0),
        (5 * HOUR, 32.0),
    ]


def test_stacked_profile_gap_falls_back_to_lower_stack_level() -> None:
    """Like OCTT TC_072: stack level 1 runs 150 s, stack level 0 runs 400 s."""
    low = sc.parse_profile(
        1, body(1, sc.TX_DEFAULT, 0, [(0, 6), (100, 8), (200, 10)], duration=400)
    )
    high = sc.parse_profile(1, body(2, sc.TX_DEFAULT, 1, [(0, 10), (100, 9)], duration=150))
    assert composite([low, high], T0, 600) == [
        (0, 10.0),
        (100, 9.0),
        (150, 8.0),
        (200, 10.0),
        (400, 32.0),
    ]


# ============================================================================ time zones


@pytest.mark.parametrize(
    ("zone", "day_before", "change_day"),
    [
        (BERLIN, datetime(2026, 3, 28, 22, 0), datetime(2026, 3, 29)),  # CET -> CEST
        (BERLIN, datetime(2026, 10, 24, 22, 0), datetime(2026, 10, 25)),  # CEST -> CET
        (LONDON, datetime(2026, 3, 28, 22, 0), datetime(2026, 3, 29)),  # GMT -> BST
        (LONDON, datetime(2026, 10, 24, 22, 0), datetime(2026, 10, 25)),  # BST -> GMT
    ],
)
def test_daily_recurrence_keeps_its_utc_time_across_dst(
    zone: ZoneInfo, day_before: datetime, change_day: datetime
) -> None:
    """A Daily profile starting 22:00 local time the day before a DST change (startSchedule
    written with the local UTC offset) repeats every 24 h of absolute time: after the change
    it starts at 22:00 +/- 1 h local time, at the same UTC time."""
    local_start = day_before.replace(tzinfo=zone)
    written = local_start.isoformat()  # e.g. 2026-03-28T22:00:00+01:00
    assert written.endswith(("+01:00", "+02:00", "+00:00"))
    p = sc.parse_profile(
        0,
        body(
            1,
            sc.TX_DEFAULT,
            0,
            [(0, 10), (8 * HOUR, 32)],
            kind="Recurring",
            recurrencyKind="Daily",
            start=local_start,
        ),
    )
    same_instant_in_utc = sc.parse_profile(
        0,
        {
            **p.body,
            "chargingSchedule": {
                **p.body["chargingSchedule"],
                "startSchedule": local_start.astimezone(UTC).isoformat(),
            },
        },
    )
    next_start_utc = local_start.astimezone(UTC) + timedelta(days=1)
    offset_before = local_start.utcoffset()
    offset_after = (change_day + timedelta(hours=12)).replace(tzinfo=zone).utcoffset()
    assert offset_before is not None and offset_after is not None
    assert offset_before != offset_after  # the change happens in between
    # The next evening: the limit starts at the same UTC time...
    for q in (p, same_instant_in_utc):
        assert limit([q], next_start_utc - timedelta(seconds=1)) == 32
        assert limit([q], next_start_utc) == 10
        assert limit([q], next_start_utc + timedelta(hours=8)) == 32
    # ...which on the wall clock is an hour later (spring) or earlier (autumn).
    local_next = next_start_utc.astimezone(zone)
    shift = offset_after - offset_before
    assert local_next.hour == 22 + int(shift.total_seconds() // 3600)
    # The composite over the change: boundaries exactly 24 h of absolute time apart.
    periods = composite([p], local_start.astimezone(UTC), 2 * 86400)
    assert periods == [(0, 10.0), (8 * HOUR, 32.0), (24 * HOUR, 10.0), (32 * HOUR, 32.0)]


def test_absolute_profile_in_local_time_across_spring_forward() -> None:
    # 01:00 to 04:00 local Berlin time on the night of the change is only 2 h long.
    start = datetime(2026, 3, 29, 1, 0, tzinfo=BERLIN)
    end = datetime(2026, 3, 29, 4, 0, tzinfo=BERLIN)
    # (Python subtracts two datetimes of the same zone on the wall clock: 3 h. Not OCPP.)
    assert end - start == timedelta(hours=3)
    duration = int((end.astimezone(UTC) - start.astimezone(UTC)).total_seconds())
    assert duration == 2 * HOUR
    p = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 7)], start=start, duration=duration))
    assert limit([p], datetime(2026, 3, 29, 3, 59, tzinfo=BERLIN)) == 7
    assert limit([p], end) == 32


# ============================================================================ units and limits


def test_watts_are_converted_with_voltage_and_phases() -> None:
    p = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 11040)], unit="W"))
    assert limit([p], T0) == pytest.approx(16.0)
    # numberPhases 1 cannot be honoured (no phase switching): the vehicle draws on all three
    # phases, so 2300 W is 2300 / (230 * 3) A, not 10 A (which would be 6900 W).
    one_phase = sc.parse_profile(0, body(2, sc.TX_DEFAULT, 1, [(0, 2300)], unit="W", phases=1))
    assert limit([one_phase], T0) == pytest.approx(2300 / 690)


def test_watts_on_a_single_phase_installation() -> None:
    # numberPhases 3 cannot be more than the installation has: 1 phase, 11 kW is 47.8 A.
    p = sc.parse_profile(
        0, body(1, sc.TX_DEFAULT, 0, [(0, 5520), (HOUR, 11000)], unit="W", phases=3)
    )
    periods = sc.composite(
        [p],
        connector_id=1,
        start=T0,
        duration_s=2 * HOUR,
        tx=None,
        hardware_max_a=32,
        voltage_v=230,
        phases=1,
    ).periods
    assert [(q.start_s, sc.floor_tenth(q.limit_a), q.number_phases) for q in periods] == [
        (0, 24.0, 1),
        (HOUR, 32.0, 1),
    ]


def test_limits_below_six_amps_are_kept_as_they_are() -> None:
    # The computation keeps 0..6 A; the station pauses the charger below 6 A.
    p = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 5.9), (60, 0), (120, 6)]))
    assert composite([p], T0, 180) == [(0, 5.9), (60, 0.0), (120, 6.0)]
    w = sc.parse_profile(0, body(2, sc.TX_DEFAULT, 1, [(0, 4000)], unit="W"))  # 5.8 A
    assert limit([w], T0) == pytest.approx(4000 / 690)
    assert limit([w], T0) < 6


def test_decimal_limits_from_the_ocpp_library_are_stored_as_json_numbers() -> None:
    raw = body(1, sc.TX_DEFAULT, 0, [(0, Decimal("7.5"))])
    raw["chargingSchedule"]["minChargingRate"] = Decimal("6.0")
    p = sc.parse_profile(0, raw)
    assert p.periods[0].limit == 7.5
    assert p.min_rate == 6.0
    assert p.body["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"] == 7.5
    assert isinstance(p.body["chargingSchedule"]["minChargingRate"], float)


def test_validity_window_and_duration() -> None:
    p = sc.parse_profile(
        0,
        body(1, sc.TX_DEFAULT, 0, [(0, 6)], validTo=(T0 + timedelta(hours=1)).isoformat()),
    )
    assert limit([p], T0 + timedelta(minutes=30)) == 6
    assert limit([p], T0 + timedelta(hours=2)) == 32
    q = sc.parse_profile(0, body(2, sc.TX_DEFAULT, 0, [(0, 6)], duration=60))
    assert limit([q], T0 + timedelta(seconds=59)) == 6
    assert limit([q], T0 + timedelta(seconds=61)) == 32
    later = sc.parse_profile(
        0, body(3, sc.TX_DEFAULT, 0, [(0, 6)], validFrom=(T0 + timedelta(minutes=10)).isoformat())
    )
    assert composite([later], T0, HOUR) == [(0, 32.0), (600, 6.0)]


def test_composite_edges_at_fractions_of_a_second_take_effect_at_the_next_second() -> None:
    p = sc.parse_profile(
        0, body(1, sc.TX_DEFAULT, 0, [(0, 10)], start=T0 + timedelta(seconds=2, milliseconds=500))
    )
    assert composite([p], T0, 10) == [(0, 32.0), (3, 10.0)]


def test_composite_stays_within_its_duration() -> None:
    p = sc.parse_profile(0, body(1, sc.TX_DEFAULT, 0, [(0, 10), (100, 12), (200, 14)]))
    assert composite([p], T0, 100) == [(0, 10.0)]
    assert composite([p], T0, 101) == [(0, 10.0), (100, 12.0)]
    assert composite([p], T0 + timedelta(seconds=150), 0) == [(0, 12.0)]


def test_next_boundary_of_a_recurring_profile_wraps_to_the_next_cycle() -> None:
    p = sc.parse_profile(
        0,
        body(1, sc.TX_DEFAULT, 0, [(0, 10), (HOUR, 20)], kind="Recurring", recurrencyKind="Daily"),
    )
    assert sc.next_boundary([p], T0 + timedelta(minutes=1), None) == T0 + timedelta(hours=1)
    assert sc.next_boundary([p], T0 + timedelta(hours=2), None) == T0 + timedelta(days=1)
    assert sc.next_boundary([p], T0 - timedelta(hours=2), None) == T0


# ============================================================================ sharing


def test_cp_max_is_shared_between_sessions() -> None:
    assert sc.share(16, [(1, 32), (2, 32)], minimum_a=6) == {1: 8, 2: 8}
    # What one does not want goes to the other.
    assert sc.share(20, [(1, 6), (2, 32)], minimum_a=6) == {1: 6, 2: 14}
    # Not enough for two: the later session waits.
    assert sc.share(10, [(1, 32), (2, 32)], minimum_a=6) == {1: 10, 2: 0}
    # A session paused by its own profile keeps its (low) limit and takes no share.
    assert sc.share(16, [(1, 0), (2, 32)], minimum_a=6) == {1: 0, 2: 16}


# ============================================================================ parsing


@pytest.mark.parametrize(
    ("profile", "connector", "message"),
    [
        (body(1, sc.TX, 0, [(10, 6)]), 1, "startPeriod 0"),
        (body(1, sc.TX, 0, [(0, 6), (0, 8)]), 1, "strictly increasing"),
        (body(1, sc.TX, 0, [(0, 6), (60, 8), (30, 7)]), 1, "strictly increasing"),
        (body(1, sc.TX, 0, [(0, 6)], unit="kW"), 1, "chargingRateUnit"),
        (body(1, "Bogus", 0, [(0, 6)]), 1, "Purpose"),
        (body(1, sc.TX, 0, [(0, 6)], kind="Sometimes"), 1, "Kind"),
        (body(1, sc.TX, 0, [(0, 6)], kind="Recurring"), 1, "recurrencyKind"),
        (
            body(
                1, sc.TX_DEFAULT, 0, [(0, 6)], kind="Recurring", recurrencyKind="Daily", start=None
            ),
            1,
            "startSchedule",
        ),
        (body(1, sc.CP_MAX, 0, [(0, 6)], start=None), 0, "transaction"),
        (body(1, sc.TX, 0, [(0, -1)]), 1, "negative"),
        (body(1, sc.TX, -1, [(0, 6)]), 1, "stackLevel"),
        (body(1, sc.TX, 0, [(0, 6)], phases=4), 1, "numberPhases"),
        (body(1, sc.TX, 0, [(0, 6)], duration=-5), 1, "duration"),
        (body(1, sc.CP_MAX, 0, [(0, 6)]), 1, "connector 0"),
        (body(1, sc.CP_MAX, 0, [(0, 6)], kind="Relative", start=None), 0, "Relative"),
        (body(1, sc.TX, 0, [(0, 6)]), 0, "needs a connector"),
        (body(1, sc.TX_DEFAULT, 0, [(0, 6)], transactionId=5), 1, "transactionId"),
        (
            body(
                1,
                sc.TX_DEFAULT,
                0,
                [(0, 6)],
                validFrom="2026-01-02T00:00:00Z",
                validTo="2026-01-01T00:00:00Z",
            ),
            1,
            "validTo",
        ),
        (body(1, sc.TX_DEFAULT, 0, [(0, 6)], validFrom="2026-01-02T00:00:00"), 1, "time zone"),
        ({"chargingProfileId": 1}, 1, "malformed"),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(
    profile: dict[str, Any], connector: int, message: str
) -> None:
    with pytest.raises(sc.ProfileError, match=message):
        sc.parse_profile(connector, profile)


# ============================================================================ ChargingProfiles


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path)
    yield s
    s.close()


def profiles_of(store: Store, **overrides: object) -> ChargingProfiles:
    return ChargingProfiles(
        store=store,
        keys=ConfigKeys(overrides=overrides),
        connector_ids=[1, 2],
        max_current_a=32,
        voltage_v=230,
        phases=3,
    )


def ids(cp: ChargingProfiles) -> list[int]:
    return sorted(p.profile_id for p in cp.installed)


def stored_ids(store: Store) -> list[int]:
    return sorted(int(raw["profile"]["chargingProfileId"]) for raw in store.profiles())


TX = sc.Tx(transaction_id=77, start=T0)


@pytest.mark.parametrize(
    ("connector", "profile", "tx", "overrides"),
    [
        (1, body(9, sc.TX, 0, [(0, 6)], kind="Relative", start=None), None, {}),
        (1, body(9, sc.TX, 0, [(0, 6)], transactionId=76), TX, {}),
        (0, body(9, sc.TX_DEFAULT, 11, [(0, 6)]), None, {}),
        (0, body(9, sc.TX_DEFAULT, 0, [(i * 60, 6) for i in range(49)]), None, {}),
        (0, body(9, sc.TX_DEFAULT, 0, [(0, 6), (60, 8), (60, 9)]), None, {}),
        (
            0,
            body(9, sc.TX_DEFAULT, 0, [(0, 6000)], unit="W"),
            None,
            {"ChargingScheduleAllowedChargingRateUnit": "Current"},
        ),
        (
            0,
            body(9, sc.TX_DEFAULT, 0, [(0, 6)], unit="A"),
            None,
            {"ChargingScheduleAllowedChargingRateUnit": "Power"},
        ),
        (0, body(9, sc.TX_DEFAULT, 0, [(0, 6)], unit="kW"), None, {}),
        (0, body(9, sc.TX_DEFAULT, 3, [(0, 6)]), None, {"MaxChargingProfilesInstalled": 1}),
        (3, body(9, sc.TX_DEFAULT, 0, [(0, 6)]), None, {}),
        (1, body(9, sc.CP_MAX, 0, [(0, 6)]), None, {}),
    ],
    ids=[
        "tx-without-transaction",
        "other-transaction",
        "stack-level",
        "too-many-periods",
        "not-increasing",
        "W-not-allowed",
        "A-not-allowed",
        "unknown-unit",
        "max-installed",
        "unknown-connector",
        "cp-max-on-connector",
    ],
)
def test_refused_profiles_install_nothing(
    store: Store,
    connector: int,
    profile: dict[str, Any],
    tx: sc.Tx | None,
    overrides: dict[str, object],
) -> None:
    cp = profiles_of(store, **overrides)
    unit = "W" if overrides.get("ChargingScheduleAllowedChargingRateUnit") == "Power" else "A"
    first = body(1, sc.TX_DEFAULT, 0, [(0, 10 if unit == "A" else 6900)], unit=unit)
    assert cp.set(0, first, None) == "Accepted"
    before = (ids(cp), stored_ids(store), cp.limit(1, T0, tx))
    assert before[2] == pytest.approx(10)
    assert cp.set(connector, profile, tx) == "Rejected"
    assert (ids(cp), stored_ids(store), cp.limit(1, T0, tx)) == before


def test_keys_at_their_limit_are_accepted(store: Store) -> None:
    cp = profiles_of(store, MaxChargingProfilesInstalled=2)
    many = [(i * 60, 6 + i % 10) for i in range(48)]
    assert cp.set(0, body(1, sc.TX_DEFAULT, 10, many), None) == "Accepted"
    assert cp.set(1, body(2, sc.TX, 0, [(0, 6)], transactionId=77), TX) == "Accepted"
    # Full, but a replacement does not add a profile.
    assert cp.set(1, body(2, sc.TX, 0, [(0, 8)]), TX) == "Accepted"
    assert cp.set(0, body(3, sc.TX_DEFAULT, 10, [(0, 9)]), None) == "Accepted"
    assert ids(cp) == [2, 3]


def test_replacement_rules(store: Store) -> None:
    cp = profiles_of(store)
    assert cp.set(0, body(1, sc.TX_DEFAULT, 0, [(0, 10)]), None) == "Accepted"
    assert cp.set(1, body(2, sc.TX_DEFAULT, 0, [(0, 11)]), None) == "Accepted"  # other connector
    assert cp.set(0, body(3, sc.TX_DEFAULT, 1, [(0, 12)]), None) == "Accepted"  # other level
    assert cp.set(0, body(4, sc.CP_MAX, 0, [(0, 30)]), None) == "Accepted"  # other purpose
    assert ids(cp) == [1, 2, 3, 4]
    # Same purpose, stack level and connector: replaces (with another id).
    assert cp.set(0, body(5, sc.TX_DEFAULT, 1, [(0, 13)]), None) == "Accepted"
    assert ids(cp) == [1, 2, 4, 5]
    # Same id: replaces whatever it was.
    assert cp.set(2, body(1, sc.TX_DEFAULT, 4, [(0, 14)]), None) == "Accepted"
    assert ids(cp) == [1, 2, 4, 5]
    assert next(p for p in cp.installed if p.profile_id == 1).connector_id == 2
    assert stored_ids(store) == [1, 2, 4, 5]


def test_clear_charging_profile(store: Store) -> None:
    cp = profiles_of(store)
    cp.set(0, body(1, sc.TX_DEFAULT, 0, [(0, 10)]), None)
    cp.set(1, body(2, sc.TX_DEFAULT, 0, [(0, 11)]), None)
    cp.set(1, body(3, sc.TX_DEFAULT, 1, [(0, 12)]), None)
    cp.set(0, body(4, sc.CP_MAX, 0, [(0, 30)]), None)
    cp.set(2, body(5, sc.TX, 2, [(0, 8)]), TX)
    assert cp.clear(99, None, None, None) == "Unknown"
    assert cp.clear(None, 2, sc.TX_DEFAULT, None) == "Unknown"
    assert cp.clear(4, 1, None, None) == "Accepted"  # the id wins over the other criteria
    assert ids(cp) == [1, 2, 3, 5]
    assert cp.clear(None, None, None, 2) == "Accepted"  # by stack level
    assert ids(cp) == [1, 2, 3]
    assert cp.clear(None, 1, sc.TX_DEFAULT, 1) == "Accepted"  # connector + purpose + level
    assert ids(cp) == [1, 2]
    assert cp.clear(None, 0, None, None) == "Accepted"  # by connector
    assert ids(cp) == [2]
    assert cp.clear(None, None, None, None) == "Accepted"  # everything
    assert ids(cp) == [] == stored_ids(store)
    assert cp.clear(None, None, None, None) == "Unknown"


def test_profiles_persist_and_tx_profiles_end_with_the_transaction(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    cp = profiles_of(store)
    raw = body(1, sc.TX_DEFAULT, 0, [(0, Decimal("9.5"))])  # as the ocpp library hands it
    assert cp.set(0, raw, None) == "Accepted"
    assert cp.set(0, body(2, sc.CP_MAX, 0, [(0, 20)]), None) == "Accepted"
    assert cp.set(1, body(3, sc.TX, 1, [(0, 6)]), TX) == "Accepted"
    assert cp.set(2, body(4, sc.TX, 1, [(0, 7)]), TX) == "Accepted"
    assert cp.end_transaction(1)
    assert ids(cp) == [1, 2, 4]
    assert not cp.end_transaction(1)
    store.close()
    # A restart: every transaction was ended, so TxProfiles are gone.
    store = Store.open(tmp_path)
    again = profiles_of(store)
    again.load()
    assert ids(again) == [1, 2]
    assert stored_ids(store) == [1, 2]
    assert again.limit(1, T0, None) == 9.5
    store.close()


def test_remote_start_profile_checks(store: Store) -> None:
    cp = profiles_of(store)
    assert cp.remote_problem(1, body(1, sc.TX, 0, [(0, 6)], kind="Relative", start=None)) is None
    assert "TxProfile" in (cp.remote_problem(1, body(1, sc.TX_DEFAULT, 0, [(0, 6)])) or "")
    assert "stackLevel" in (cp.remote_problem(1, body(1, sc.TX, 99, [(0, 6)])) or "")
    # A transactionId in it is ignored: the profile is for the transaction being started.
    with_id = body(1, sc.TX, 0, [(0, 12)], kind="Relative", start=None, transactionId=5)
    assert cp.remote_problem(1, with_id) is None
    assert cp.install_remote(1, with_id, TX)
    assert cp.limit(1, T0, TX) == 12


def test_composite_in_amps_and_watts(store: Store) -> None:
    cp = profiles_of(store)
    assert cp.set(0, body(1, sc.TX_DEFAULT, 0, [(0, 10), (600, 16)]), None) == "Accepted"
    assert cp.set(0, body(2, sc.CP_MAX, 0, [(0, 11040)], unit="W", duration=300), None) == (
        "Accepted"
    )
    answer = cp.composite(1, T0 - timedelta(milliseconds=400), 1200, None, None)
    assert answer is not None
    start, schedule = answer
    assert start == "2026-11-25T22:00:00.000Z" == schedule["startSchedule"]
    assert schedule["duration"] == 1200 and schedule["chargingRateUnit"] == "A"
    assert schedule["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 10.0, "numberPhases": 3},
        {"startPeriod": 600, "limit": 16.0, "numberPhases": 3},
    ]
    answer = cp.composite(1, T0, 1200, "W", None)
    assert answer is not None
    assert answer[1]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 6900.0, "numberPhases": 3},
        {"startPeriod": 600, "limit": 11040.0, "numberPhases": 3},
    ]
    # Connector 0: the hardware maximum, capped by the ChargePointMaxProfile for 300 s.
    answer = cp.composite(0, T0, 1200, None, None)
    assert answer is not None
    assert [(p["startPeriod"], p["limit"]) for p in answer[1]["chargingSchedulePeriod"]] == [
        (0, 16.0),
        (300, 32.0),
    ]
    assert cp.composite(3, T0, 1200, None, None) is None  # unknown connector
    assert cp.composite(1, T0, -1, None, None) is None


def test_long_composite_is_cut_at_the_period_cap(store: Store) -> None:
    cp = profiles_of(store)
    daily = body(
        1, sc.TX_DEFAULT, 0, [(0, 10), (HOUR, 20)], kind="Recurring", recurrencyKind="Daily"
    )
    assert cp.set(0, daily, None) == "Accepted"
    answer = cp.composite(1, T0, 10 * 365 * 86400, None, None)
    assert answer is not None
    periods = answer[1]["chargingSchedulePeriod"]
    assert len(periods) == MAX_COMPOSITE_PERIODS == 1000
    # Two periods a day: the 1001st would start on day 500, where the answer ends.
    assert periods[-1] == {"startPeriod": 499 * 86400 + HOUR, "limit": 20.0, "numberPhases": 3}
    assert answer[1]["duration"] == 500 * 86400
    # Without edges, ten years are one period.
    assert cp.clear(None, None, None, None) == "Accepted"
    answer = cp.composite(1, T0, 10 * 365 * 86400, None, None)
    assert answer is not None
    assert answer[1]["duration"] == 10 * 365 * 86400
    assert answer[1]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 32.0, "numberPhases": 3}
    ]


def test_composite_uses_the_lower_hardware_maximum(store: Store) -> None:
    cp = profiles_of(store)
    answer = cp.composite(1, T0, 60, "A", None, hardware_max_a=16)
    assert answer is not None
    assert answer[1]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 16.0, "numberPhases": 3}
    ]


def test_limits_share_the_charge_point_maximum(store: Store) -> None:
    cp = profiles_of(store)
    assert cp.set(0, body(1, sc.CP_MAX, 0, [(0, 20)]), None) == "Accepted"
    txs = {1: sc.Tx(1, T0), 2: sc.Tx(2, T0 + timedelta(seconds=1))}
    hw = {1: 32.0, 2: 32.0}
    assert cp.limits(T0, txs, hardware_max_a=hw, charging=[1, 2]) == {1: 10, 2: 10}
    assert cp.limits(T0, {1: txs[1], 2: None}, hardware_max_a=hw, charging=[1]) == {1: 20, 2: 20}
    assert cp.set(2, body(2, sc.TX, 0, [(0, 6)], kind="Relative", start=None), txs[2]) == (
        "Accepted"
    )
    later = T0 + timedelta(seconds=2)  # the second transaction has started
    assert cp.limits(later, txs, hardware_max_a=hw, charging=[1, 2]) == {1: 14, 2: 6}


# ============================================================================ properties

BASE = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)  # across the European spring DST change


@st.composite
def profile_bodies(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    """A random, valid profile for connector 0 or 1 (whole seconds, as OCPP sends them)."""
    purpose = draw(st.sampled_from([sc.CP_MAX, sc.TX_DEFAULT, sc.TX]))
    connector = (
        0 if purpose == sc.CP_MAX else (1 if purpose == sc.TX else draw(st.sampled_from([0, 1])))
    )
    kinds = ["Absolute", "Recurring"] + ([] if purpose == sc.CP_MAX else ["Relative"])
    kind = draw(st.sampled_from(kinds))
    unit = draw(st.sampled_from(["A", "W"]))
    starts = sorted(draw(st.sets(st.integers(1, 30 * HOUR), max_size=5)))
    top = 50.0 if unit == "A" else 50.0 * 690
    limits = draw(
        st.lists(
            st.integers(0, int(top * 10)).map(lambda v: v / 10),
            min_size=len(starts) + 1,
            max_size=len(starts) + 1,
        )
    )
    phases = draw(st.sampled_from([None, 1, 2, 3]))
    extra: dict[str, Any] = {}
    if kind == "Recurring":
        extra["recurrencyKind"] = draw(st.sampled_from(["Daily", "Weekly"]))
    if draw(st.booleans()):
        extra["validFrom"] = (
            BASE + timedelta(seconds=draw(st.integers(-86400, 86400)))
        ).isoformat()
    if draw(st.booleans()):
        extra["validTo"] = (
            BASE + timedelta(seconds=draw(st.integers(86401, 3 * 86400)))
        ).isoformat()
    start = (
        None
        if kind == "Relative"
        else BASE + timedelta(seconds=draw(st.integers(-2 * 86400, 86400)))
    )
    duration = draw(st.one_of(st.none(), st.integers(1, 2 * 86400)))
    raw = body(
        0,
        purpose,
        draw(st.integers(0, 3)),
        list(zip([0, *starts], limits, strict=True)),
        kind=kind,
        start=start,
        unit=unit,
        phases=phases,
        duration=duration,
        **extra,
    )
    return connector, raw


@st.composite
def profile_sets(draw: st.DrawFn) -> list[sc.Profile]:
    installed: list[sc.Profile] = []
    for pid, (connector, raw) in enumerate(
        draw(st.lists(profile_bodies(), min_size=1, max_size=6))
    ):
        p = sc.parse_profile(connector, {**raw, "chargingProfileId": pid})
        key = (p.purpose, p.stack_level, p.connector_id)
        installed = [q for q in installed if (q.purpose, q.stack_level, q.connector_id) != key]
        installed.append(p)
    return installed


def winner_amps(
    profiles: list[sc.Profile], at: datetime, tx_start: datetime | None, phases: int
) -> float | None:
    """The limit (A) of the highest stack level in force among ``profiles``."""
    in_force = [(p, q) for p in profiles if (q := sc.period_at(p, at, tx_start)) is not None]
    if not in_force:
        return None
    p, q = max(in_force, key=lambda pq: pq[0].stack_level)
    return sc.to_amps(q, p.unit, voltage_v=230, phases=phases)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    profile_sets(),
    st.booleans(),
    st.integers(0, 2 * 86400),
    st.sampled_from([1, 3]),
    st.integers(0, 10**6),
)
def test_composite_is_the_stacked_minimum_and_changes_only_at_profile_edges(
    profiles: list[sc.Profile], with_tx: bool, offset_s: int, phases: int, salt: int
) -> None:
    start = BASE + timedelta(seconds=offset_s)
    tx = sc.Tx(None, start - timedelta(seconds=salt % 7200)) if with_tx else None
    tx_start = tx.start if tx else start
    duration = 2 * 86400
    periods = sc.composite(
        profiles,
        connector_id=1,
        start=start,
        duration_s=duration,
        tx=tx,
        hardware_max_a=32,
        voltage_v=230,
        phases=phases,
    ).periods
    assert periods[0].start_s == 0
    assert all(a.start_s < b.start_s for a, b in itertools.pairwise(periods))
    assert all(isinstance(p.start_s, int) and p.start_s < duration for p in periods)
    # Boundaries only where some applicable profile has an edge.
    relevant = sc.applicable(profiles, 1, tx)
    edge_offsets = {
        math.ceil((edge - start).total_seconds())
        for p in relevant
        for edge in sc.edges(p, start, start + timedelta(seconds=duration), tx_start)
    }
    assert {p.start_s for p in periods[1:]} <= edge_offsets
    ends = [p.start_s for p in periods[1:]] + [duration]
    for period, end in zip(periods, ends, strict=True):
        for offset in {period.start_s, (period.start_s + end) // 2, end - 1}:
            at = start + timedelta(seconds=offset)
            # Piecewise constant: the limit in force anywhere in the period is the period's.
            assert (
                sc.effective_limit_a(
                    profiles,
                    connector_id=1,
                    now=at,
                    tx=tx,
                    hardware_max_a=32,
                    voltage_v=230,
                    phases=phases,
                    relative_start=start,
                )
                == period.limit_a
            )
            # Never above the hardware maximum or a ChargePointMaxProfile in force...
            assert 0 <= period.limit_a <= 32
            cap = winner_amps([p for p in relevant if p.purpose == sc.CP_MAX], at, tx_start, phases)
            if cap is not None:
                assert period.limit_a <= cap + 1e-9
            # ...nor above the transaction-level profile that governs the connector.
            for group in (
                [p for p in relevant if p.purpose == sc.TX],
                [p for p in relevant if p.purpose == sc.TX_DEFAULT and p.connector_id == 1],
                [p for p in relevant if p.purpose == sc.TX_DEFAULT and p.connector_id == 0],
            ):
                governing = winner_amps(group, at, tx_start, phases)
                if governing is not None:
                    assert period.limit_a <= governing + 1e-9
                    assert period.limit_a == pytest.approx(
                        min(32, 32 if cap is None else cap, governing)
                    )
                    break
            else:
                assert period.limit_a == pytest.approx(min(32, 32 if cap is None else cap))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([sc.TX_DEFAULT, sc.CP_MAX]),
            st.integers(0, 3),
            st.lists(
                st.tuples(st.integers(0, 86400), st.floats(0, 80, allow_nan=False)),
                min_size=1,
                max_size=6,
            ),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 2 * 86400),
)
def test_limit_never_exceeds_an_applicable_cap(
    specs: list[tuple[str, int, list[tuple[int, float]]]], offset_s: int
) -> None:
    # Installation replaces a profile of the same purpose and stack level: keep the last.
    unique = {
        (purpose, stack): sorted({s: lim for s, lim in [(0, ps[0][1]), *ps]}.items())
        for purpose, stack, ps in specs
    }
    profiles = [
        sc.parse_profile(0, body(i, purpose, stack, periods))
        for i, ((purpose, stack), periods) in enumerate(unique.items())
    ]
    at = T0 + timedelta(seconds=offset_s)
    result = limit(profiles, at)
    assert 0 <= result <= 32
    for purpose in (sc.CP_MAX, sc.TX_DEFAULT):
        active = [
            (p.stack_level, sc.period_at(p, at, None)) for p in profiles if p.purpose == purpose
        ]
        in_force = [(stack, period) for stack, period in active if period is not None]
        if in_force:
            assert result <= max(in_force, key=lambda sp: sp[0])[1].limit + 1e-9
    # Piecewise constant: nothing changes between now and the next boundary.
    edge = sc.next_boundary(profiles, at, None)
    if edge is not None and edge - at > timedelta(seconds=1):
        assert limit(profiles, edge - timedelta(seconds=1)) == result


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 100), st.lists(st.floats(0, 80), max_size=5))
def test_shares_never_exceed_the_cap(cap: float, wants: list[float]) -> None:
    pairs = list(enumerate(wants, start=1))
    shares = sc.share(cap, pairs, minimum_a=6)
    charging = [cid for cid, want in pairs if want >= 6 and shares[cid] >= 6]
    assert sum(shares[cid] for cid in charging) <= cap + 1e-6
    for cid, want in pairs:
        assert 0 <= shares[cid] <= want + 1e-9
        if want >= 6:
            assert shares[cid] == 0 or shares[cid] >= 6 - 1e-9
    if cap >= 6 * len([w for w in wants if w >= 6]):
        assert all(shares[cid] >= 6 - 1e-9 for cid, want in pairs if want >= 6)


def test_an_absolute_profile_without_start_schedule_counts_from_the_start_of_charging() -> None:
    """OCPP 1.6: startSchedule is optional; "if absent the schedule will be relative to
    start of charging" -- some CSMSs send TxProfiles this way."""
    p = sc.parse_profile(1, body(1, sc.TX_DEFAULT, 0, [(0, 10), (HOUR, 20)], start=None))
    assert limit([p], T0) == 32  # no transaction: the profile does not apply yet
    tx = sc.Tx(transaction_id=7, start=T0)
    assert limit([p], T0 + timedelta(minutes=5), tx) == 10
    assert limit([p], T0 + timedelta(minutes=65), tx) == 20
