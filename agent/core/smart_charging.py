"""OCPP 1.6 charging profiles: parsing, the limit in force and the composite schedule.

Pure: time is an argument. The agent asks :func:`evaluate` (or :func:`effective_limit_a`)
for the limit now, :func:`next_boundary` for the next instant the limit may change (to arm
a timer instead of polling), :func:`composite` for GetCompositeSchedule and :func:`share`
to split a ChargePointMaxProfile between connectors that charge at the same time.

Stacking (OCPP 1.6 section 3.13), decided instant by instant:

* within a purpose, the profile with the highest stackLevel that has a period in force at
  that instant wins (a profile outside validFrom/validTo, before its startSchedule or after
  its duration is not in force, and the next stack level down applies);
* a TxProfile of the running transaction overrides the TxDefaultProfile;
* a TxDefaultProfile installed on the connector overrides one installed on connector 0;
* the result is capped by the ChargePointMaxProfile and by the hardware maximum.

Choices where the specification is loose:

* **Time.** OCPP timestamps are absolute instants; a startSchedule's UTC offset only says
  how the CSMS wrote it. A Daily recurrence repeats every 24 h of absolute time (a Weekly
  one every 7 x 24 h): across a daylight-saving change the schedule keeps its UTC time and
  moves by one hour in local time (a CSMS that wants local time sends a new profile). A
  recurrence starts at its startSchedule (no cycle before it).
* **Relative** profiles count from the transaction start. A TxDefaultProfile of kind
  Relative therefore applies only during a transaction; GetCompositeSchedule on a connector
  without a transaction shows it as if a transaction started at the schedule's start.
* **numberPhases** (default: the installation's phases, never more than those) converts a
  limit in W to A per phase: ``A = W / (nominal voltage * phases)``. The pilot cannot switch
  phases, so it has no other effect.
* **minChargingRate** is checked and kept (it is the EV's, informative) but does not change
  the limit.
* **Integer seconds.** The composite schedule is evaluated at whole seconds from its start;
  a profile edge at a fraction of a second takes effect at the next whole second.
* A ChargePointMaxProfile of kind Relative is refused (it has no transaction to count from).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from agent.core import timefmt

CP_MAX = "ChargePointMaxProfile"
TX_DEFAULT = "TxDefaultProfile"
TX = "TxProfile"
PURPOSES = (CP_MAX, TX_DEFAULT, TX)
KINDS = ("Absolute", "Recurring", "Relative")
RECURRENCY = {"Daily": timedelta(days=1), "Weekly": timedelta(days=7)}
UNITS = ("A", "W")


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
    #: The csChargingProfiles dict as received (camelCase, JSON-safe): what is persisted.
    body: dict[str, Any]
    #: ``startPeriod`` of every period (for bisection).
    starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(p.start_s for p in self.periods))

    @property
    def cycle(self) -> timedelta | None:
        """The recurrence period of a Recurring profile."""
        if self.kind != "Recurring" or self.recurrency is None:
            return None
        return RECURRENCY[self.recurrency]


def parse_time(text: str) -> datetime:
    """A profile's timestamp (it must carry a zone): see :func:`agent.core.timefmt.parse_time`."""
    try:
        return timefmt.parse_time(text, require_zone=True)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None


def plain(value: Any) -> Any:
    """A JSON-safe deep copy: the ``ocpp`` library hands decimals over as ``Decimal``."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ProfileError(f"{what} must be an integer, not {value!r}")
    if value != int(value):
        raise ProfileError(f"{what} must be an integer, not {value!r}")
    return int(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ProfileError(f"{what} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ProfileError(f"{what} must be finite, not {value!r}")
    return number


def parse_profile(connector_id: int, body: dict[str, Any]) -> Profile:
    """Build a :class:`Profile` from a camelCase csChargingProfiles dict.

    Checks everything that does not depend on the charge point's state or keys; raises
    :class:`ProfileError` naming the problem.
    """
    body = plain(body)
    try:
        schedule = body["chargingSchedule"]
        periods = tuple(
            Period(
                _int(p["startPeriod"], "startPeriod"),
                _number(p["limit"], "limit"),
                _int(p["numberPhases"], "numberPhases") if "numberPhases" in p else None,
            )
            for p in schedule["chargingSchedulePeriod"]
        )
        transaction_id = body.get("transactionId")
        duration = schedule.get("duration")
        min_rate = schedule.get("minChargingRate")
        profile = Profile(
            profile_id=_int(body["chargingProfileId"], "chargingProfileId"),
            connector_id=connector_id,
            stack_level=_int(body["stackLevel"], "stackLevel"),
            purpose=str(body["chargingProfilePurpose"]),
            kind=str(body["chargingProfileKind"]),
            recurrency=body.get("recurrencyKind"),
            valid_from=parse_time(body["validFrom"]) if "validFrom" in body else None,
            valid_to=parse_time(body["validTo"]) if "validTo" in body else None,
            transaction_id=None
            if transaction_id is None
            else _int(transaction_id, "transactionId"),
            unit=str(schedule["chargingRateUnit"]),
            start_schedule=(
                parse_time(schedule["startSchedule"]) if "startSchedule" in schedule else None
            ),
            duration_s=None if duration is None else _int(duration, "duration"),
            min_rate=None if min_rate is None else _number(min_rate, "minChargingRate"),
            periods=periods,
            body=body,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProfileError(f"malformed charging profile: missing or bad {exc}") from None
    except ValueError as exc:  # ProfileError included
        raise ProfileError(f"malformed charging profile: {exc}") from None
    _check(profile)
    return profile


def _check(p: Profile) -> None:
    if p.purpose not in PURPOSES:
        raise ProfileError(f"unknown chargingProfilePurpose {p.purpose!r}")
    if p.kind not in KINDS:
        raise ProfileError(f"unknown chargingProfileKind {p.kind!r}")
    if p.unit not in UNITS:
        raise ProfileError(f"unknown chargingRateUnit {p.unit!r}")
    if p.stack_level < 0:
        raise ProfileError("stackLevel must not be negative")
    if not p.periods or p.periods[0].start_s != 0:
        raise ProfileError("the first period must start at startPeriod 0")
    if any(b.start_s <= a.start_s for a, b in itertools.pairwise(p.periods)):
        raise ProfileError("startPeriod values must be strictly increasing")
    if any(q.limit < 0 for q in p.periods):
        raise ProfileError("a limit must not be negative")
    if any(q.number_phases is not None and not 1 <= q.number_phases <= 3 for q in p.periods):
        raise ProfileError("numberPhases must be 1, 2 or 3")
    if p.duration_s is not None and p.duration_s < 0:
        raise ProfileError("duration must not be negative")
    if p.min_rate is not None and p.min_rate < 0:
        raise ProfileError("minChargingRate must not be negative")
    if p.kind == "Recurring" and p.recurrency not in RECURRENCY:
        raise ProfileError("a Recurring profile needs recurrencyKind Daily or Weekly")
    if p.kind == "Recurring" and p.start_schedule is None:
        raise ProfileError("a Recurring profile needs a startSchedule")
    # An Absolute profile without one counts from the start of charging (OCPP 1.6 7.13:
    # "if absent the schedule will be relative to start of charging"): not for a
    # ChargePointMaxProfile, which belongs to no transaction.
    if p.valid_from is not None and p.valid_to is not None and p.valid_to <= p.valid_from:
        raise ProfileError("validTo must be after validFrom")
    if p.transaction_id is not None and p.purpose != TX:
        raise ProfileError("only a TxProfile may name a transactionId")
    if p.purpose == CP_MAX:
        if p.connector_id != 0:
            raise ProfileError("a ChargePointMaxProfile must be set on connector 0")
        if p.kind == "Relative" or (p.start_schedule is None and p.kind == "Absolute"):
            raise ProfileError(
                "a ChargePointMaxProfile cannot count from a transaction (Relative, or"
                " Absolute without startSchedule)"
            )
    if p.purpose == TX and p.connector_id == 0:
        raise ProfileError("a TxProfile needs a connector (not 0)")


# ---------------------------------------------------------------------------- one profile


def schedule_start(profile: Profile, now: datetime, tx_start: datetime | None) -> datetime | None:
    """When the profile's schedule (period 0) started for the instant ``now``.

    ``tx_start`` is where a Relative schedule counts from (None: it does not apply).
    """
    start = profile.start_schedule
    if profile.kind == "Relative" or start is None:  # (Absolute without startSchedule)
        return tx_start
    cycle = profile.cycle
    if start is None or cycle is None or now < start:
        return start
    return start + ((now - start) // cycle) * cycle


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
    return profile.periods[bisect.bisect_right(profile.starts, offset) - 1]


def phases_of(period: Period, phases: int) -> int:
    """The phases a period charges on: the installation's. The pilot cannot switch phases
    (ConnectorSwitch3to1PhaseSupported is false), so a vehicle draws the offered current on
    every phase it has, whatever numberPhases says: converting a W limit with fewer phases
    would let it draw up to three times the limit."""
    del period
    return phases


def to_amps(period: Period, unit: str, *, voltage_v: float, phases: int) -> float:
    if unit == "A":
        return period.limit
    return period.limit / (voltage_v * phases_of(period, phases))


def boundaries(profile: Profile, now: datetime, tx_start: datetime | None) -> list[datetime]:
    """Instants after ``now`` at which ``profile`` may change the limit (the next few)."""
    out: list[datetime] = []
    for edge in (profile.valid_from, profile.valid_to):
        if edge is not None and edge > now:
            out.append(edge)
    start = schedule_start(profile, now, tx_start)
    if start is None:
        return out
    bases = [start]
    if profile.cycle is not None and now >= start:
        bases.append(start + profile.cycle)
    for base in bases:
        offset = (now - base).total_seconds()
        index = bisect.bisect_right(profile.starts, offset)
        if index < len(profile.starts):
            out.append(base + timedelta(seconds=profile.starts[index]))
        if profile.duration_s is not None:
            end = base + timedelta(seconds=profile.duration_s)
            if end > now:
                out.append(end)
    return out


def edges(
    profile: Profile, start: datetime, end: datetime, tx_start: datetime | None
) -> Iterator[datetime]:
    """Every instant in the open interval (``start``, ``end``) where ``profile`` may change
    the limit: validity edges, period starts, schedule ends, recurrences."""
    for edge in (profile.valid_from, profile.valid_to):
        if edge is not None and start < edge < end:
            yield edge
    first = schedule_start(profile, start, tx_start)
    if first is None:
        return
    cycle = profile.cycle
    base = first
    while base < end:
        # Periods that start after ``start`` (bisection: a window may be short).
        index = bisect.bisect_right(profile.starts, (start - base).total_seconds())
        for start_s in profile.starts[index:]:
            at = base + timedelta(seconds=start_s)
            if at >= end:
                break
            yield at
        if profile.duration_s is not None:
            at = base + timedelta(seconds=profile.duration_s)
            if start < at < end:
                yield at
        if cycle is None:
            return
        base += cycle


# ---------------------------------------------------------------------------- stacking


@dataclass(frozen=True, slots=True)
class Tx:
    """The running transaction on a connector, as smart charging sees it."""

    transaction_id: int | None
    start: datetime


@dataclass(frozen=True, slots=True)
class Limit:
    """The limit in force: amperes per phase, and the phases it is meant for."""

    amps: float
    number_phases: int


def applicable(profiles: Iterable[Profile], connector_id: int, tx: Tx | None) -> list[Profile]:
    """The profiles that can apply to ``connector_id`` (0: the charge point as a whole)."""
    out = []
    for p in profiles:
        if p.purpose == CP_MAX:
            out.append(p)
        elif connector_id == 0:
            continue
        elif p.purpose == TX_DEFAULT:
            if p.connector_id in (0, connector_id):
                out.append(p)
        elif (
            tx is not None
            and p.connector_id == connector_id
            and p.transaction_id in (None, tx.transaction_id)
        ):
            out.append(p)  # a TxProfile of the running transaction (or naming none)
    return out


def _winner(
    profiles: Iterable[Profile], now: datetime, tx_start: datetime | None
) -> tuple[Profile, Period] | None:
    best: tuple[Profile, Period] | None = None
    for profile in profiles:
        if best is not None and profile.stack_level <= best[0].stack_level:
            continue
        period = period_at(profile, now, tx_start)
        if period is not None:
            best = (profile, period)
    return best


def evaluate(
    profiles: Iterable[Profile],
    *,
    connector_id: int,
    now: datetime,
    tx: Tx | None,
    hardware_max_a: float,
    voltage_v: float,
    phases: int,
    relative_start: datetime | None = None,
) -> Limit:
    """The limit in force on ``connector_id`` at ``now`` (connector 0: the charge point's).

    ``relative_start`` is where Relative profiles count from when there is no transaction
    (GetCompositeSchedule's "as if a transaction started now"); None: they do not apply.
    """
    tx_start = tx.start if tx is not None else relative_start
    relevant = applicable(profiles, connector_id, tx)
    limit, number_phases = hardware_max_a, phases

    def apply(found: tuple[Profile, Period] | None) -> bool:
        nonlocal limit, number_phases
        if found is None:
            return False
        profile, period = found
        limit = min(limit, to_amps(period, profile.unit, voltage_v=voltage_v, phases=phases))
        number_phases = min(number_phases, phases_of(period, phases))
        return True

    apply(_winner((p for p in relevant if p.purpose == CP_MAX), now, tx_start))
    if connector_id == 0 or apply(_winner((p for p in relevant if p.purpose == TX), now, tx_start)):
        return Limit(max(0.0, limit), number_phases)
    for scope in (connector_id, 0):
        scoped = [p for p in relevant if p.purpose == TX_DEFAULT and p.connector_id == scope]
        if apply(_winner(scoped, now, tx_start)):
            break
    return Limit(max(0.0, limit), number_phases)


def effective_limit_a(
    profiles: Iterable[Profile],
    *,
    connector_id: int,
    now: datetime,
    tx: Tx | None,
    hardware_max_a: float,
    voltage_v: float,
    phases: int,
    relative_start: datetime | None = None,
) -> float:
    """The current limit (A per phase) in force on ``connector_id`` at ``now``."""
    return evaluate(
        profiles,
        connector_id=connector_id,
        now=now,
        tx=tx,
        hardware_max_a=hardware_max_a,
        voltage_v=voltage_v,
        phases=phases,
        relative_start=relative_start,
    ).amps


def cp_max_a(
    profiles: Iterable[Profile], now: datetime, *, voltage_v: float, phases: int
) -> float | None:
    """The ChargePointMaxProfile's limit (A per phase) at ``now``; None when none applies."""
    found = _winner((p for p in profiles if p.purpose == CP_MAX), now, None)
    if found is None:
        return None
    return to_amps(found[1], found[0].unit, voltage_v=voltage_v, phases=phases)


def next_boundary(
    profiles: Iterable[Profile], now: datetime, tx_start: datetime | None
) -> datetime | None:
    """The earliest instant after ``now`` at which any profile may change the limit."""
    found = [edge for p in profiles for edge in boundaries(p, now, tx_start)]
    return min(found) if found else None


# ---------------------------------------------------------------------------- composite


@dataclass(frozen=True, slots=True)
class CompositePeriod:
    start_s: int
    limit_a: float
    number_phases: int


@dataclass(frozen=True, slots=True)
class Composite:
    """A composite schedule: its periods and the seconds they cover (the duration asked
    for, or less when it was cut at ``max_periods``)."""

    periods: list[CompositePeriod]
    duration_s: int


#: The composite schedule is computed one day at a time (bounded work per step).
_WINDOW_S = 86400


def activity_edges(
    profile: Profile, start: datetime, end: datetime, tx_start: datetime | None
) -> Iterator[datetime]:
    """The instants in (``start``, ``end``) where ``profile`` may start or stop being in
    force: :func:`edges` without the starts of periods after the first."""
    for edge in (profile.valid_from, profile.valid_to):
        if edge is not None and start < edge < end:
            yield edge
    base = schedule_start(profile, start, tx_start)
    if base is None:
        return
    cycle = profile.cycle
    while base < end:
        if start < base:
            yield base
        if profile.duration_s is not None:
            at = base + timedelta(seconds=profile.duration_s)
            if start < at < end:
                yield at
        if cycle is None:
            return
        base += cycle


def next_period_start(
    profile: Profile, now: datetime, tx_start: datetime | None
) -> datetime | None:
    """The first start of a period (after the first) of ``profile`` after ``now``."""
    base = schedule_start(profile, now, tx_start)
    if base is None or now < base:
        return None
    index = bisect.bisect_right(profile.starts, (now - base).total_seconds())
    if index >= len(profile.starts):
        return None
    return base + timedelta(seconds=profile.starts[index])


def composite(
    profiles: Iterable[Profile],
    *,
    connector_id: int,
    start: datetime,
    duration_s: int,
    tx: Tx | None,
    hardware_max_a: float,
    voltage_v: float,
    phases: int,
    max_periods: int | None = None,
) -> Composite:
    """The composite schedule of ``connector_id`` from ``start`` for ``duration_s`` seconds.

    Periods start at whole seconds from ``start`` (a fractional edge takes effect at the
    next whole second), each differs from the one before, and the first starts at 0. Without
    a transaction, Relative profiles count from ``start``. With ``max_periods``, the schedule
    ends before the period that would exceed it (its duration says where).

    A sweep, near-linear in the number of profiles: each stacking group
    (ChargePointMaxProfile, TxProfile, the connector's TxDefaultProfile, connector 0's)
    keeps the profiles in force in a heap by stack level, updated only where a profile
    starts or stops being in force (:func:`activity_edges`: a few per profile); the starts
    of periods are visited only for the profile on top of its group, the only one whose
    period matters. Same result as :func:`composite_by_sampling`, which re-stacks every
    profile at every edge of every profile (quadratic: seconds with 500 staggered
    profiles); tests/agent/test_composite_sweep.py checks that they agree.
    """
    relevant = applicable(profiles, connector_id, tx)
    tx_start = tx.start if tx is not None else start
    # The groups in the order :func:`evaluate` stacks them.
    cp_max, tx_group, own_default, zero_default = 0, 1, 2, 3
    group_of = [
        cp_max
        if p.purpose == CP_MAX
        else tx_group
        if p.purpose == TX
        else own_default
        if p.connector_id == connector_id
        else zero_default
        for p in relevant
    ]
    count = len(relevant)
    #: Per profile: (amperes, phases) of its period, None when not in force. Whether it is
    #: None is always right; the period itself only for the profile on top of its group.
    in_force: list[tuple[float, int] | None] = [None] * count
    looked: list[int] = [-1] * count  # the offset a profile was last looked at
    pending: list[int | None] = [None] * count  # the offset of its next period start
    heaps: list[list[tuple[int, int]]] = [[], [], [], []]
    tops: list[int | None] = [None] * 4
    activity, period_start = 0, 1
    queue: list[int] = []  # offsets with events (a heap)
    events: dict[int, list[tuple[int, int]]] = {}

    def add(offset: int, kind: int, index: int) -> None:
        if offset not in events:
            events[offset] = []
            heapq.heappush(queue, offset)
        events[offset].append((kind, index))

    def look(index: int, offset: int, now: datetime) -> None:
        was = in_force[index]
        profile = relevant[index]
        looked[index] = offset
        period = period_at(profile, now, tx_start)
        if period is None:
            in_force[index] = None
            return
        amps = to_amps(period, profile.unit, voltage_v=voltage_v, phases=phases)
        in_force[index] = (amps, phases_of(period, phases))
        if was is None:
            # Highest stack level first; the first listed among equals (as _winner).
            heapq.heappush(heaps[group_of[index]], (-profile.stack_level, index))

    def top(group: int) -> int | None:
        heap = heaps[group]
        while heap and in_force[heap[0][1]] is None:
            heapq.heappop(heap)  # no longer in force (lazy removal)
        return heap[0][1] if heap else None

    def stacked() -> tuple[float, int]:
        limit, number_phases = hardware_max_a, phases

        def apply(group: int) -> bool:
            nonlocal limit, number_phases
            index = tops[group]
            if index is None:
                return False
            found = in_force[index]
            assert found is not None
            limit = min(limit, found[0])
            number_phases = min(number_phases, found[1])
            return True

        apply(cp_max)
        if connector_id != 0 and not apply(tx_group) and not apply(own_default):
            apply(zero_default)
        return max(0.0, limit), number_phases

    out: list[CompositePeriod] = []
    window = 0
    while True:
        window_end = min(duration_s, window + _WINDOW_S)
        window_start_at = start + timedelta(seconds=window)
        window_end_at = start + timedelta(seconds=window_end)
        queue.clear()
        events.clear()
        for heap in heaps:
            heap.clear()
        in_force[:] = [None] * count
        pending[:] = [None] * count
        tops[:] = [None] * 4
        for index, profile in enumerate(relevant):
            look(index, window, window_start_at)
            for edge in activity_edges(profile, window_start_at, window_end_at, tx_start):
                add(math.ceil((edge - start).total_seconds()), activity, index)
        add(window, activity, -1)  # (the window's start: everything was just looked at)
        while queue:
            offset = heapq.heappop(queue)
            if offset >= window_end and offset != 0:
                break  # (the next window starts there)
            now = start + timedelta(seconds=offset)
            for kind, index in events.pop(offset):
                if index < 0:
                    continue
                if kind == period_start:
                    if pending[index] != offset or tops[group_of[index]] != index:
                        continue  # superseded, or not on top: its period does not matter
                    pending[index] = None
                if looked[index] != offset:
                    look(index, offset, now)
            for group in range(4):
                first = tops[group] = top(group)
                if first is None:
                    continue
                if looked[first] != offset:
                    look(first, offset, now)  # (came on top: its period now)
                # Its next period start (again: its schedule may have moved to a new cycle).
                at = next_period_start(relevant[first], now, tx_start)
                if at is not None and at < window_end_at:
                    next_offset = math.ceil((at - start).total_seconds())
                    if pending[first] != next_offset:
                        pending[first] = next_offset
                        add(next_offset, period_start, first)
            amps, number_phases = stacked()
            last = out[-1] if out else None
            if last and (last.limit_a, last.number_phases) == (amps, number_phases):
                continue
            if max_periods is not None and len(out) >= max_periods:
                return Composite(out, offset)
            out.append(CompositePeriod(offset, amps, number_phases))
        if window_end >= duration_s:
            return Composite(out, duration_s)
        window = window_end


def composite_by_sampling(
    profiles: Iterable[Profile],
    *,
    connector_id: int,
    start: datetime,
    duration_s: int,
    tx: Tx | None,
    hardware_max_a: float,
    voltage_v: float,
    phases: int,
    max_periods: int | None = None,
) -> Composite:
    """The reference composite schedule: :func:`evaluate` at every edge of every profile.

    Quadratic (every edge re-stacks every profile): kept as the executable specification
    :func:`composite` is checked against (tests/agent/test_composite_sweep.py).

    Periods start at whole seconds from ``start`` (a fractional edge takes effect at the
    next whole second), each differs from the one before, and the first starts at 0. Without
    a transaction, Relative profiles count from ``start``. With ``max_periods``, the schedule
    ends before the period that would exceed it (its duration says where).
    """
    relevant = applicable(profiles, connector_id, tx)
    tx_start = tx.start if tx is not None else start
    out: list[CompositePeriod] = []
    window = 0
    while True:
        window_end = min(duration_s, window + _WINDOW_S)
        offsets = {window}
        for profile in relevant:
            window_start_at = start + timedelta(seconds=window)
            window_end_at = start + timedelta(seconds=window_end)
            for edge in edges(profile, window_start_at, window_end_at, tx_start):
                offsets.add(math.ceil((edge - start).total_seconds()))
        for offset in sorted(offsets):
            if offset >= window_end and offset != 0:
                break  # (the next window starts there)
            limit = evaluate(
                relevant,
                connector_id=connector_id,
                now=start + timedelta(seconds=offset),
                tx=tx,
                hardware_max_a=hardware_max_a,
                voltage_v=voltage_v,
                phases=phases,
                relative_start=start,
            )
            last = out[-1] if out else None
            if last and (last.limit_a, last.number_phases) == (limit.amps, limit.number_phases):
                continue
            if max_periods is not None and len(out) >= max_periods:
                return Composite(out, offset)
            out.append(CompositePeriod(offset, limit.amps, limit.number_phases))
        if window_end >= duration_s:
            return Composite(out, duration_s)
        window = window_end


def floor_tenth(value: float) -> float:
    """Round down to the 0.1 OCPP limits are given in (never above the limit)."""
    return math.floor(value * 10 + 1e-6) / 10


# ---------------------------------------------------------------------------- sharing


def share(
    cap_a: float, wants: Sequence[tuple[int, float]], *, minimum_a: float
) -> dict[int, float]:
    """Split ``cap_a`` (a ChargePointMaxProfile) between connectors charging at once.

    ``wants`` lists ``(connector, own limit)`` in priority order (the first-started
    transaction first). Water-filling: an equal share each, and what a connector does not
    want goes to the others. A connector whose own limit is below ``minimum_a`` pauses
    anyway and keeps its limit; when the cap cannot give every other one ``minimum_a``, the
    last in priority get 0 (they pause) so that the others can charge. The shares never add
    up to more than ``cap_a``.
    """
    result = {cid: min(want, cap_a) for cid, want in wants}
    active = [(cid, want) for cid, want in wants if want >= minimum_a]
    while active and cap_a / len(active) < minimum_a:
        cid, _ = active.pop()
        result[cid] = 0.0
    remaining = cap_a
    ordered = sorted(active, key=lambda item: item[1])
    for index, (cid, want) in enumerate(ordered):
        given = min(want, remaining / (len(ordered) - index))
        result[cid] = given
        remaining -= given
    return result
