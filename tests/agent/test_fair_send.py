"""The sender's fairness rule (agent.core.fair_send): neither queue starves the other."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core.fair_send import FairTurn


def test_a_burst_of_volatile_messages_lets_the_queue_through_every_other_send() -> None:
    turn = FairTurn()
    sent = [turn.choose(volatile_waiting=True, queued_ready=True) for _ in range(8)]
    assert sent == ["volatile", "queued"] * 4


def test_either_alone_goes_at_once_and_nothing_ready_sends_nothing() -> None:
    turn = FairTurn()
    assert turn.choose(volatile_waiting=False, queued_ready=True) == "queued"
    assert turn.choose(volatile_waiting=False, queued_ready=True) == "queued"
    assert turn.choose(volatile_waiting=True, queued_ready=False) == "volatile"
    assert turn.choose(volatile_waiting=False, queued_ready=False) is None
    # After a queued message, a status change goes first.
    turn = FairTurn(last="queued")
    assert turn.choose(volatile_waiting=True, queued_ready=True) == "volatile"


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=200))
def test_a_ready_queue_never_waits_behind_two_volatile_messages(
    steps: list[tuple[bool, bool]],
) -> None:
    turn = FairTurn()
    volatile_in_a_row = 0
    for volatile_waiting, queued_ready in steps:
        choice = turn.choose(volatile_waiting=volatile_waiting, queued_ready=queued_ready)
        if not (volatile_waiting or queued_ready):
            assert choice is None
            continue
        assert choice in (("volatile",) if not queued_ready else ("volatile", "queued"))
        if queued_ready and choice == "volatile":
            volatile_in_a_row += 1
            assert volatile_in_a_row <= 1  # the next send with the queue ready is queued
        elif choice == "queued":
            volatile_in_a_row = 0
        else:
            volatile_in_a_row = 0  # (the queue was not ready: nothing was kept waiting)
