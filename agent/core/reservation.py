"""The Reservation profile's admission rules (OCPP 1.6 sections 5.13 and 9.3), pure.

Each connector is in one of five states as a reservation sees it (:func:`state`).
:func:`admit` answers ReserveNow from the states and the reservations already held;
:func:`held_for_zero` says which connectors reservations of connector 0 hold (the charge
point keeps as many connectors free as there are such reservations; when it is down to
that many, those report Reserved).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

FREE, PLUGGED, BUSY, FAULTED, UNAVAILABLE = "Free", "Plugged", "Busy", "Faulted", "Unavailable"
#: States in which a connector can still start a transaction (for its reservation's holder).
USABLE = (FREE, PLUGGED)


def state(*, faulted: bool, operative: bool, busy: bool, occupied: bool) -> str:
    """A connector's state for reservations: ``busy`` with a transaction (or finishing
    one), ``occupied`` with a car plugged in, a tag waiting for one, or a start under way."""
    if faulted:
        return FAULTED
    if not operative:
        return UNAVAILABLE
    if busy:
        return BUSY
    if occupied:
        return PLUGGED  # no transaction yet: Occupied for a new reservation, usable
    return FREE


def admit(connector_id: int, states: Mapping[int, str], taken: Collection[int], zero: int) -> str:
    """ReserveNow's status for ``connector_id`` (0: any connector).

    Args:
        states: every connector's :func:`state`.
        taken: connectors a reservation already holds (by their own id).
        zero: how many reservations of connector 0 are held.
    """
    # Free for a new reservation: Available ones only. A connector with a car plugged
    # in (or a start under way) is Occupied, also when asked for through connector 0.
    free = [cid for cid, s in states.items() if s == FREE and cid not in taken]
    if connector_id == 0:
        if len(free) > zero:
            return "Accepted"
        if all(s == FAULTED for s in states.values()):
            return "Faulted"
        if all(s in (FAULTED, UNAVAILABLE) for s in states.values()):
            return "Unavailable"
        return "Occupied"
    s = states[connector_id]
    if s == FAULTED:
        return "Faulted"
    if s == UNAVAILABLE:
        return "Unavailable"
    if s != FREE or connector_id in taken:
        return "Occupied"
    if len(free) - 1 < zero:
        return "Occupied"  # a reservation of connector 0 counts on this one
    return "Accepted"


def held_for_zero(
    states: Mapping[int, str], reserved: Collection[int], specific: Collection[int], zero: int
) -> set[int]:
    """The connectors that reservations of connector 0 hold (they report Reserved).

    What such a reservation may hold: Available connectors without a reservation of their
    own (as :func:`admit` counts them), and one it already holds (``reserved``) while its
    holder plugs in there. They are held only when no more of them are left than there
    are reservations of connector 0.
    """
    free = [
        cid
        for cid, s in states.items()
        if cid not in specific and (s == FREE or (cid in reserved and s in USABLE))
    ]
    return set(free) if zero > 0 and len(free) <= zero else set()
