"""ChangeAvailability's rules as tables (agent/core/availability.py), connector 0 included:
what changes at once, what waits for a transaction, and the status the CSMS gets."""

from __future__ import annotations

import pytest

from agent.core.availability import Plan, after_transaction, change

IDLE = {1: False, 2: False}
ONE_CHARGING = {1: True, 2: False}
BOTH_CHARGING = {1: True, 2: True}

CHANGES = [
    (1, False, IDLE, Plan("Accepted", {1: False}, {})),
    (1, True, IDLE, Plan("Accepted", {1: True}, {})),
    (3, False, IDLE, Plan("Rejected")),  # no connector 3
    (1, False, ONE_CHARGING, Plan("Scheduled", {}, {1: False})),
    (1, True, ONE_CHARGING, Plan("Accepted", {1: True}, {})),  # Operative: at once
    (2, False, ONE_CHARGING, Plan("Accepted", {2: False}, {})),
    # connector 0: the whole charger
    (0, False, IDLE, Plan("Accepted", {1: False, 2: False, 0: False}, {})),
    (0, True, IDLE, Plan("Accepted", {1: True, 2: True, 0: True}, {})),
    (0, False, ONE_CHARGING, Plan("Scheduled", {2: False}, {1: False, 0: False})),
    (0, False, BOTH_CHARGING, Plan("Scheduled", {}, {1: False, 2: False, 0: False})),
    (0, True, BOTH_CHARGING, Plan("Accepted", {1: True, 2: True, 0: True}, {})),
]


@pytest.mark.parametrize(("connector", "operative", "running", "plan"), CHANGES)
def test_change(connector: int, operative: bool, running: dict[int, bool], plan: Plan) -> None:
    assert change(connector, operative, running) == plan


ENDINGS = [
    (1, {}, {}),
    (1, {1: False}, {1: False}),
    (2, {1: False}, {}),  # another connector's transaction ended
    (1, {1: False, 0: False}, {1: False, 0: False}),  # the last one: connector 0 follows
    (1, {1: False, 2: False, 0: False}, {1: False}),  # 2 still charging: 0 waits
    (2, {2: False, 0: False}, {2: False, 0: False}),
    (1, {0: False}, {0: False}),  # connector 1 was not waiting, nobody else is
]


@pytest.mark.parametrize(("connector", "pending", "due"), ENDINGS)
def test_after_transaction(connector: int, pending: dict[int, bool], due: dict[int, bool]) -> None:
    assert after_transaction(connector, pending) == due
