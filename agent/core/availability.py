"""ChangeAvailability's rules, connector 0 included (OCPP 1.6 sections 5.2 and 4.9), pure.

A connector with a transaction that is asked to become Inoperative changes once the
transaction ends (Scheduled); every other change is at once. Connector 0 is the charge
point as a whole: asked for it, every connector changes, and connector 0 itself follows
once the last of their transactions has ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Plan:
    """What a ChangeAvailability does: its status, the availability (True: Operative) of
    the connectors that change at once, and of those that change later (0 included)."""

    status: str
    now: dict[int, bool] = field(default_factory=dict)
    scheduled: dict[int, bool] = field(default_factory=dict)


def change(connector_id: int, operative: bool, running: Mapping[int, bool]) -> Plan:
    """ChangeAvailability for ``connector_id`` (0: all); ``running`` says, per connector,
    whether a transaction runs there."""
    if connector_id != 0 and connector_id not in running:
        return Plan("Rejected")
    targets = list(running) if connector_id == 0 else [connector_id]
    now: dict[int, bool] = {}
    scheduled: dict[int, bool] = {}
    for cid in targets:
        if running[cid] and not operative:
            scheduled[cid] = operative
        else:
            now[cid] = operative
    if connector_id == 0:
        (scheduled if scheduled else now)[0] = operative
    return Plan("Scheduled" if scheduled else "Accepted", now, scheduled)


def after_transaction(connector_id: int, pending: Mapping[int, bool]) -> dict[int, bool]:
    """A transaction ended on ``connector_id``: the scheduled changes that apply now (its
    own, and connector 0's once no other connector waits)."""
    due = {connector_id: pending[connector_id]} if connector_id in pending else {}
    waiting = [cid for cid in pending if cid not in (0, connector_id)]
    if 0 in pending and not waiting:
        due[0] = pending[0]
    return due
