"""Which message the session's single sender sends next: fair between the two queues.

Pure (no clock, no I/O). The sender has two sources: *volatile* messages (statuses,
heartbeats, triggered messages: kept in memory) and the durable *transaction queue*
(StartTransaction, MeterValues, StopTransaction: on disk, in order). Giving volatile
messages strict priority lets a CSMS that keeps triggering messages starve the queue (issue
18: no periodic MeterValues delivered during a 30 s TriggerMessage burst). The rule here:

**Alternate.** When both have something ready, the one that did not go last goes now; when
only one has, it goes. So the queue's head waits behind at most one volatile message, and a
volatile message behind at most one queued one (a status change still goes out at once
when the queue is empty, which is nearly always). A queued head that is not *ready* (it
waits out a retry delay after a failure) does not count: volatile messages flow meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Choice = Literal["volatile", "queued"]


@dataclass(slots=True)
class FairTurn:
    """The sender's turn-keeper: ask :meth:`choose` before every send."""

    last: Choice | None = None

    def choose(self, *, volatile_waiting: bool, queued_ready: bool) -> Choice | None:
        """What to send now (None: nothing is ready)."""
        choice: Choice
        if volatile_waiting and queued_ready:
            choice = "queued" if self.last == "volatile" else "volatile"
        elif volatile_waiting:
            choice = "volatile"
        elif queued_ready:
            choice = "queued"
        else:
            return None
        self.last = choice
        return choice
