"""The Reservation profile's admission rules as tables (agent/core/reservation.py): one row
per situation, the ReserveNow status a CSMS gets and the connectors a reservation of
connector 0 holds."""

from __future__ import annotations

import pytest

from agent.core.reservation import (
    BUSY,
    FAULTED,
    FREE,
    PLUGGED,
    UNAVAILABLE,
    admit,
    held_for_zero,
    state,
)


@pytest.mark.parametrize(
    ("faulted", "operative", "busy", "occupied", "expected"),
    [
        (False, True, False, False, FREE),
        (False, True, False, True, PLUGGED),
        (False, True, True, True, BUSY),
        (False, False, False, False, UNAVAILABLE),
        (False, False, True, True, UNAVAILABLE),  # Inoperative wins over a transaction
        (True, False, True, True, FAULTED),  # a fault wins over everything
    ],
)
def test_state(faulted: bool, operative: bool, busy: bool, occupied: bool, expected: str) -> None:
    assert state(faulted=faulted, operative=operative, busy=busy, occupied=occupied) == expected


#: (connector asked for, states of connectors 1 and 2, taken by own id, reservations of 0,
#: ReserveNow status)
ADMISSION = [
    # a specific connector
    (1, {1: FREE, 2: FREE}, set(), 0, "Accepted"),
    (1, {1: PLUGGED, 2: FREE}, set(), 0, "Occupied"),  # a car plugged in, no transaction
    (1, {1: BUSY, 2: FREE}, set(), 0, "Occupied"),
    (1, {1: FAULTED, 2: FREE}, set(), 0, "Faulted"),
    (1, {1: UNAVAILABLE, 2: FREE}, set(), 0, "Unavailable"),
    (1, {1: FREE, 2: FREE}, {1}, 0, "Occupied"),  # reserved already (another id)
    (1, {1: FREE, 2: FREE}, set(), 1, "Accepted"),  # connector 2 still free for the 0 one
    (1, {1: FREE, 2: BUSY}, set(), 1, "Occupied"),  # the only free one is counted on by 0
    (2, {1: FREE, 2: FREE}, {1}, 1, "Occupied"),  # 1 reserved, 2 is the 0 one's
    # connector 0: any connector
    (0, {1: FREE, 2: FREE}, set(), 0, "Accepted"),
    (0, {1: FREE, 2: FREE}, set(), 1, "Accepted"),
    (0, {1: FREE, 2: FREE}, set(), 2, "Occupied"),  # one each already
    (0, {1: FREE, 2: FREE}, {1}, 1, "Occupied"),
    (0, {1: PLUGGED, 2: BUSY}, set(), 0, "Occupied"),
    (0, {1: FAULTED, 2: FAULTED}, set(), 0, "Faulted"),
    (0, {1: FAULTED, 2: UNAVAILABLE}, set(), 0, "Unavailable"),
    (0, {1: UNAVAILABLE, 2: UNAVAILABLE}, set(), 0, "Unavailable"),
    (0, {1: FAULTED, 2: BUSY}, set(), 0, "Occupied"),
]


@pytest.mark.parametrize(("connector", "states", "taken", "zero", "expected"), ADMISSION)
def test_admission(
    connector: int, states: dict[int, str], taken: set[int], zero: int, expected: str
) -> None:
    assert admit(connector, states, taken, zero) == expected


#: (states, connectors flagged reserved now, reserved by own id, reservations of 0, held)
HOLDING = [
    ({1: FREE, 2: FREE}, set(), set(), 0, set()),
    ({1: FREE, 2: FREE}, set(), set(), 1, set()),  # two free for one: none held yet
    ({1: FREE, 2: BUSY}, set(), set(), 1, {1}),  # down to one free: it is held
    ({1: FREE, 2: FREE}, set(), {2}, 1, {1}),  # 2 has its own reservation
    ({1: FREE, 2: FREE}, set(), set(), 2, {1, 2}),
    ({1: PLUGGED, 2: BUSY}, {1}, set(), 1, {1}),  # the holder plugs in: still held
    ({1: PLUGGED, 2: BUSY}, set(), set(), 1, set()),  # a stranger's car: not free
    ({1: FAULTED, 2: BUSY}, {1}, set(), 1, set()),  # a faulted one holds nothing
]


@pytest.mark.parametrize(("states", "reserved", "specific", "zero", "held"), HOLDING)
def test_connectors_held_by_reservations_of_connector_zero(
    states: dict[int, str], reserved: set[int], specific: set[int], zero: int, held: set[int]
) -> None:
    assert held_for_zero(states, reserved, specific, zero) == held
