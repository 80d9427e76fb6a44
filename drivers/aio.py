"""asyncio helpers for drivers (the agent has its own in ``agent.aio``)."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11 (Debian bookworm) ``asyncio.wait_for`` -- which pymodbus and the
    ``ocpp`` library use -- returns the result (or raises the library's own error) instead
    of raising CancelledError when the cancellation and the answer arrive in the same loop
    iteration. The task is then still marked as cancelling but carries on: a polling loop
    would never end and the agent would never stop on SIGTERM. Call this after such an
    await, whatever it returned or raised (in a ``finally``). Our own code uses
    ``asyncio.timeout``, which does not have the problem.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
