"""The Reservation profile (OCPP 1.6 sections 5.13, 5.2 and 9.3): ReserveNow,
CancelReservation, expiry, and which idTags a reserved connector accepts.

A reservation holds one connector for an idTag (or for any idTag with the same
parentIdTag) until its expiryDate, a CancelReservation, or the transaction it was made for
starts (that StartTransaction carries its reservationId). Reservations are kept in the
store, so they survive a restart; an expired one is dropped.

A reservation of connector 0 (when ReserveConnectorZeroSupported) holds *a* connector: the
charge point keeps at least as many connectors free as there are such reservations, and
when it is down to that many, the free ones report Reserved and start only for a holder.

The connector's status is derived (``agent.core.connector``): this module only sets each
connector's ``reserved`` input and asks the charge point (its port) to refresh the status.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent.chargepoint.model import Connector
from agent.core import reservation as rules
from agent.core.config_keys import ConfigKeys
from agent.core.timefmt import parse_time
from agent.store import ReservationRecord, Store

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort


class ParentLookup(Protocol):
    def parent_of(self, id_tag: str) -> str | None: ...


log = logging.getLogger("evcp.reservations")


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: int
    connector_id: int
    id_tag: str
    parent_id_tag: str | None
    expiry: datetime

    def held_by(self, id_tag: str, parent_id_tag: str | None) -> bool:
        """True when ``id_tag`` (with its parent ``parent_id_tag``) may use it."""
        if self.id_tag.casefold() == id_tag.casefold():
            return True
        return bool(
            self.parent_id_tag
            and parent_id_tag
            and self.parent_id_tag.casefold() == parent_id_tag.casefold()
        )


class Reservations:
    """The reservations, and the charge point's :class:`~agent.chargepoint.port.StartGuard`.

    Args:
        port: the charge point.
        tags: where an idTag's parent (group) is looked up (the local list and cache).
    """

    def __init__(
        self, *, port: ChargePointPort, store: Store, keys: ConfigKeys, tags: ParentLookup
    ) -> None:
        self.port = port
        self.store = store
        self.keys = keys
        self.tags = tags
        self._by_id: dict[int, Reservation] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Reload the stored reservations (the event loop runs); drop expired ones."""
        now = self.port.now()
        for rec in self.store.reservations():
            try:
                expiry = parse_time(rec.expiry)
            except ValueError:
                expiry = now
            known = rec.connector_id == 0 or rec.connector_id in self.port.connectors
            if expiry <= now or not known:
                log.info("reservation %d expired while the agent was down", rec.reservation_id)
                self.store.delete_reservation(rec.reservation_id)
                continue
            self._add(
                Reservation(rec.reservation_id, rec.connector_id, rec.id_tag,
                            rec.parent_id_tag, expiry),
                persist=False,
            )  # fmt: skip
        self.refresh()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ------------------------------------------------------------------ CSMS requests
    def reserve_now(
        self,
        connector_id: int,
        expiry_date: str,
        id_tag: str,
        parent_id_tag: str | None,
        reservation_id: int,
    ) -> str:
        """ReserveNow: Accepted, Faulted, Occupied, Rejected or Unavailable."""
        port = self.port
        if connector_id == 0:
            if not self.keys.get_bool("ReserveConnectorZeroSupported"):
                return "Rejected"
        elif connector_id not in port.connectors:
            return "Rejected"
        try:
            expiry = parse_time(expiry_date)
        except ValueError:
            return "Rejected"
        if expiry <= port.now():
            log.info("ReserveNow %d refused: expiryDate %s has passed", reservation_id,
                     expiry_date)  # fmt: skip
            return "Rejected"
        # A reservation with the same id is replaced: judge the request without it.
        others = [r for r in self._by_id.values() if r.reservation_id != reservation_id]
        status = self._admit(connector_id, others)
        if status != "Accepted":
            log.info("ReserveNow %d for connector %d: %s", reservation_id, connector_id, status)
            return status
        if reservation_id in self._by_id:
            self._remove(reservation_id, persist=False)
        self._add(
            Reservation(reservation_id, connector_id, id_tag, parent_id_tag, expiry),
            persist=True,
        )
        log.info("connector %d reserved (reservation %d) until %s", connector_id,
                 reservation_id, expiry_date)  # fmt: skip
        self.refresh()
        return "Accepted"

    def cancel(self, reservation_id: int) -> str:
        """CancelReservation: Accepted, or Rejected for an unknown reservation."""
        if reservation_id not in self._by_id:
            return "Rejected"
        self._remove(reservation_id, persist=True)
        log.info("reservation %d cancelled", reservation_id)
        self.refresh()
        return "Accepted"

    def _admit(self, connector_id: int, others: list[Reservation]) -> str:
        taken = {r.connector_id for r in others if r.connector_id != 0}
        zero = sum(1 for r in others if r.connector_id == 0)
        states = {c.id: self._state(c) for c in self.port.connectors.values()}
        return rules.admit(connector_id, states, taken, zero)

    def _state(self, c: Connector) -> str:
        inputs = c.inputs()
        return rules.state(
            faulted=inputs.fault is not None or inputs.meter_failed,
            operative=c.operative and self.port.operative0,
            busy=c.tx is not None or c.finishing,
            occupied=c.plugged or c.waiting_tag is not None or c.starting,
        )

    # ------------------------------------------------------------------ starting
    def check_start(
        self, c: Connector, id_tag: str, parent_id_tag: str | None
    ) -> tuple[bool, int | None]:
        """May ``id_tag`` start a transaction on ``c``? Returns ``(allowed,
        reservationId to put in the StartTransaction)``."""
        if not self._by_id:
            return True, None
        if parent_id_tag is None:
            parent_id_tag = self.tags.parent_of(id_tag)
        specific = self.on_connector(c.id)
        if specific is not None:
            if specific.held_by(id_tag, parent_id_tag):
                return True, specific.reservation_id
            return False, None
        for r in self._by_id.values():
            if r.connector_id == 0 and r.held_by(id_tag, parent_id_tag):
                return True, r.reservation_id
        if c.reserved:
            return False, None  # held for a reservation of connector 0
        return True, None

    def consume(self, reservation_id: int | None, transaction: int) -> None:
        """The reservation's transaction started: the reservation ends."""
        if reservation_id is None or reservation_id not in self._by_id:
            return
        self._remove(reservation_id, persist=True)
        log.info("reservation %d used by transaction %d", reservation_id, transaction)
        self.refresh()

    def on_connector(self, connector_id: int) -> Reservation | None:
        for r in self._by_id.values():
            if r.connector_id == connector_id:
                return r
        return None

    def held_for(self, c: Connector, id_tag: str) -> bool:
        """``c`` is reserved for ``id_tag`` (or for its group)."""
        r = self.on_connector(c.id)
        return r is not None and r.held_by(id_tag, self.tags.parent_of(id_tag))

    def group_may_hold(self, c: Connector) -> bool:
        """True when a reservation that holds ``c`` is for a group (has a parentIdTag):
        an idTag whose parent is not known yet may be one of its holders."""
        specific = self.on_connector(c.id)
        if specific is not None:
            return specific.parent_id_tag is not None
        return c.reserved and any(
            r.connector_id == 0 and r.parent_id_tag is not None for r in self._by_id.values()
        )

    def reserved_for_others(self, c: Connector, id_tag: str) -> bool:
        """True when ``c`` cannot start for ``id_tag`` (for choosing a connector)."""
        return not self.check_start(c, id_tag, None)[0]

    # ------------------------------------------------------------------ status
    def update_flags(self) -> list[Connector]:
        """Set each connector's ``reserved`` input; return the connectors that changed."""
        connectors = list(self.port.connectors.values())
        specific = {r.connector_id for r in self._by_id.values() if r.connector_id != 0}
        zero = sum(1 for r in self._by_id.values() if r.connector_id == 0)
        held = rules.held_for_zero(
            {c.id: self._state(c) for c in connectors},
            {c.id for c in connectors if c.reserved},
            specific,
            zero,
        )
        changed = []
        for c in connectors:
            reserved = c.id in specific or c.id in held
            if c.reserved != reserved:
                c.reserved = reserved
                changed.append(c)
        return changed

    def refresh(self) -> None:
        for c in self.update_flags():
            self.port.refresh_status(c)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "reservation_id": r.reservation_id,
                "connector_id": r.connector_id,
                "expiry": r.expiry.isoformat(),
            }
            for r in sorted(self._by_id.values(), key=lambda r: r.reservation_id)
        ]

    # ------------------------------------------------------------------ internals
    def _add(self, r: Reservation, *, persist: bool) -> None:
        self._by_id[r.reservation_id] = r
        if persist:
            self.store.put_reservation(
                ReservationRecord(r.reservation_id, r.connector_id, r.id_tag, r.parent_id_tag,
                                  r.expiry.isoformat())
            )  # fmt: skip
        delay = max(0.0, (r.expiry - self.port.now()).total_seconds())
        self._timers[r.reservation_id] = asyncio.get_running_loop().call_later(
            delay, self._expire, r.reservation_id
        )

    def _remove(self, reservation_id: int, *, persist: bool) -> None:
        self._by_id.pop(reservation_id, None)
        timer = self._timers.pop(reservation_id, None)
        if timer is not None:
            timer.cancel()
        if persist:
            self.store.delete_reservation(reservation_id)

    def _expire(self, reservation_id: int) -> None:
        self._timers.pop(reservation_id, None)
        if reservation_id not in self._by_id:
            return
        log.info("reservation %d expired", reservation_id)
        self._remove(reservation_id, persist=True)
        self.refresh()
