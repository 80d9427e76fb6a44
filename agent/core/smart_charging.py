"""OCPP 1.6 charging profiles: validation, installation rules and the limit in force.

Pure: time is an argument. The agent asks :func:`effective_limit_a` for the limit now and
:func:`next_boundary` for the next instant the limit may change (to arm a timer instead of
polling).

Stacking (OCPP 1.6 section 3.13): within a purpose the valid profile with the highest
stackLevel wins; a TxProfile overrides the TxDefaultProfile; a connector-specific
TxDefaultProfile overrides one installed on connector 0; the result is capped by the
ChargePointMaxProfile and by the hardware maximum. W limits are converted to A with the
nominal voltage and the period's numberPhases (default: the installation's phases).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

CP_MAX = "ChargePointMaxProfile"
TX_DEFAULT = "TxDefaultProfile"
TX = "TxProfile"
PURPOSES = (CP_MAX, TX_DEFAULT, TX)


class ProfileError(ValueError):
    """The profile is malformed or not allowed here; the message says why (logged)."""


@dataclass(frozen=True, slots=True)
class Period:
    start_s: int
    limit: float
    number_phases: int | None


@dataclass(frozen=True, slots=True)
class Profile:
    profile_id: int
    connector_id: int
    stack_level: int
    purpose: str
    kind: str
    recurrency: str | None
    valid_from: datetime | None
    valid_to: datetime | None
    transaction_id: int | None
    unit: str
    start_schedule: datetime | None
    duration_s: int | None
    min_rate: float | None
    periods: tuple[Period, ...]
    body: dict[str, Any]


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ProfileError(f"timestamp without a time zone: {text}")
    return value


def parse_profile(connector_id: int, body: dict[str, Any]) -> Profile:
    """Build a :class:`Profile` from a camelCase csChargingProfiles dict (schema-valid)."""
    try:
        schedule = body["chargingSchedule"]
        periods = tuple(
            Period(
                int(p["startPeriod"]),
                float(p["limit"]),
                int(p["numberPhases"]) if "numberPhases" in p else None,
            )
            for p in schedule["chargingSchedulePeriod"]
        )
        profile = Profile(
            profile_id=int(body["chargingProfileId"]),
            connector_id=connector_id,
            stack_level=int(body["stackLevel"]),
            purpose=str(body["chargingProfilePurpose"]),
            kind=str(body["chargingProfileKind"]),
            recurrency=body.get("recurrencyKind"),
            valid_from=parse_time(body["validFrom"]) if "validFrom" in body else None,
            valid_to=parse_time(body["validTo"]) if "validTo" in body else None,
            transaction_id=body.get("transactionId"),
            unit=str(schedule["chargingRateUnit"]),
            start_schedule=(
                parse_time(schedule["startSchedule"]) if "startSchedule" in schedule else None
            ),
            duration_s=schedule.get("duration"),
            min_rate=schedule.get("minChargingRate"),
            periods=periods,
            body=body,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"malformed charging profile: {exc}") from None
    if profile.purpose not in PURPOSES:
        raise ProfileError(f"unknown chargingProfilePurpose {profile.purpose!r}")
    if profile.unit not in ("A", "W"):
        raise ProfileError(f"unknown chargingRateUnit {profile.unit!r}")
    if not periods or periods[0].start_s != 0:
        raise ProfileError("the first period must start at startPeriod 0")
    if any(b.start_s <= a.start_s for a, b in itertools.pairwise(periods)):
        raise ProfileError("startPeriod values must be strictly increasing")
    if any(p.limit < 0 for p in periods):
        raise ProfileError("a limit must not be negative")
    if profile.kind == "Recurring" and (profile.recurrency not in ("Daily", "Weekly")):
        raise ProfileError("a Recurring profile needs recurrencyKind Daily or Weekly")
    if profile.kind in ("Absolute", "Recurring") and profile.start_schedule is None:
        raise ProfileError(f"a {profile.kind} profile needs a startSchedule")
    if profile.kind not in ("Absolute", "Recurring", "Relative"):
        raise ProfileError(f"unknown chargingProfileKind {profile.kind!r}")
    return profile


def schedule_start(profile: Profile, now: datetime, tx_start: datetime | None) -> datetime | None:
    """When the profile's schedule (period 0) started for the instant ``now``."""
    if profile.kind == "Relative":
        return tx_start
    start = profile.start_schedule
    if start is None:
        return None
    if profile.kind == "Recurring" and now >= start:
        period = timedelta(days=1 if profile.recurrency == "Daily" else 7)
        cycles = (now - start) // period
        start = start + cycles * period
    return start


def period_at(profile: Profile, now: datetime, tx_start: datetime | None) -> Period | None:
    """The period in force at ``now``, or None when the profile does not apply then."""
    if profile.valid_from is not None and now < profile.valid_from:
        return None
    if profile.valid_to is not None and now >= profile.valid_to:
        return None
    start = schedule_start(profile, now, tx_start)
    if start is None or now < start:
        return None
    offset = (now - start).total_seconds()
    if profile.duration_s is not None and offset >= profile.duration_s:
        return None
    current = None
    for period in profile.periods:
        if period.start_s <= offset:
            current = period
    return current


def to_amps(period: Period, unit: str, *, voltage_v: float, phases: int) -> float:
    if unit == "A":
        return period.limit
    n = period.number_phases or phases
    return period.limit / (voltage_v * n)


@dataclass(frozen=True, slots=True)
class Tx:
    """The running transaction on a connector, as smart charging sees it."""

    transaction_id: int | None
    start: datetime


def _winner(
    profiles: list[Profile], now: datetime, tx_start: datetime | None
) -> tuple[Profile, Period] | None:
    best: tuple[Profile, Period] | None = None
    for profile in profiles:
        period = period_at(profile, now, tx_start)
        if period is not None and (best is None or profile.stack_level > best[0].stack_level):
            best = (profile, period)
    return best


def effective_limit_a(
    profiles: list[Profile],
    *,
    connector_id: int,
    now: datetime,
    tx: Tx | None,
    hardware_max_a: float,
    voltage_v: float,
    phases: int,
) -> float:
    """The current limit (A) in force on ``connector_id`` at ``now``."""
    tx_start = tx.start if tx else None
    limit = hardware_max_a

    def amps(found: tuple[Profile, Period] | None) -> float | None:
        if found is None:
            return None
        return to_amps(found[1], found[0].unit, voltage_v=voltage_v, phases=phases)

    cp_max = amps(_winner([p for p in profiles if p.purpose == CP_MAX], now, tx_start))
    if cp_max is not None:
        limit = min(limit, cp_max)
    tx_limit = None
    if tx is not None:
        tx_limit = amps(
            _winner(
                [
                    p
                    for p in profiles
                    if p.purpose == TX
                    and p.connector_id == connector_id
                    and (p.transaction_id is None or p.transaction_id == tx.transaction_id)
                ],
                now,
                tx_start,
            )
        )
    if tx_limit is None:
        for scope in (connector_id, 0):
            tx_limit = amps(
                _winner(
                    [p for p in profiles if p.purpose == TX_DEFAULT and p.connector_id == scope],
                    now,
                    tx_start,
                )
            )
            if tx_limit is not None:
                break
    if tx_limit is not None:
        limit = min(limit, tx_limit)
    return max(0.0, limit)


def boundaries(profile: Profile, now: datetime, tx_start: datetime | None) -> list[datetime]:
    """Instants after ``now`` at which ``profile`` may change the limit."""
    out: list[datetime] = []
    for edge in (profile.valid_from, profile.valid_to):
        if edge is not None and edge > now:
            out.append(edge)
    start = schedule_start(profile, now, tx_start)
    if start is None:
        return out
    starts = [start]
    if profile.kind == "Recurring":
        cycle = timedelta(days=1 if profile.recurrency == "Daily" else 7)
        starts.append(start + cycle)
    for base in starts:
        for period in profile.periods:
            at = base + timedelta(seconds=period.start_s)
            if at > now:
                out.append(at)
        if profile.duration_s is not None:
            end = base + timedelta(seconds=profile.duration_s)
            if end > now:
                out.append(end)
        if base > now:
            out.append(base)
    return out


def next_boundary(
    profiles: list[Profile], now: datetime, tx_start: datetime | None
) -> datetime | None:
    """The earliest instant after ``now`` at which any profile may change the limit."""
    edges = [edge for p in profiles for edge in boundaries(p, now, tx_start)]
    return min(edges) if edges else None
