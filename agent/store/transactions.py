"""The transactions table. A transaction begins and ends in the same commit as its
StartTransaction or StopTransaction is queued; its last meter reading is written with its
next queued message (:class:`~agent.store.tables.MeterNotes`), or at most every
``note_interval_s`` otherwise: not at every meter poll (flash wear)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.store.db import Database
from agent.store.queue import MessageQueue
from agent.store.tables import MeterNotes, TxRecord


class NoteInterval(Protocol):
    #: Seconds between writes of a running transaction's last meter reading when no
    #: message of the transaction is queued in between.
    note_interval_s: float


class Transactions:
    def __init__(
        self,
        database: Database,
        queue: MessageQueue,
        notes: MeterNotes,
        limits: NoteInterval,
        flush_if_due: Callable[[], None],
    ) -> None:
        self._database = database
        self._queue = queue
        self._notes = notes
        self._limits = limits
        self._flush_if_due = flush_if_due

    def begin(
        self,
        *,
        connector_id: int,
        id_tag: str,
        meter_start_wh: int,
        start_ts: str,
        reservation_id: int | None,
        start_payload: dict[str, Any],
    ) -> int:
        """Record a new transaction and queue its StartTransaction in one commit."""
        self._queue.resync()

        def begin(db: sqlite3.Connection) -> tuple[int, int, int]:
            cur = db.execute(
                "INSERT INTO transactions (connector_id, id_tag, meter_start_wh, start_ts,"
                " reservation_id, last_meter_wh, last_meter_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    connector_id,
                    id_tag,
                    meter_start_wh,
                    start_ts,
                    reservation_id,
                    meter_start_wh,
                    start_ts,
                ),
            )
            local_id = int(cur.lastrowid or 0)
            seq, delta = self._queue.insert(db, "StartTransaction", start_payload, local_id)
            return local_id, seq, delta

        local_id, seq, delta = self._database.write(begin)
        self._queue.queued("StartTransaction", start_payload, local_id, seq, delta)
        return local_id

    def end(
        self,
        local_id: int,
        *,
        meter_stop_wh: int,
        stop_ts: str,
        reason: str,
        stop_payload: dict[str, Any],
    ) -> None:
        """Close a transaction and queue its StopTransaction in one commit."""
        self._queue.resync()

        def end(db: sqlite3.Connection) -> tuple[int, int]:
            db.execute(
                "UPDATE transactions SET active = 0, meter_stop_wh = ?, stop_ts = ?,"
                " stop_reason = ?, last_meter_wh = ?, last_meter_ts = ? WHERE local_id = ?",
                (meter_stop_wh, stop_ts, reason, meter_stop_wh, stop_ts, local_id),
            )
            return self._queue.insert(db, "StopTransaction", stop_payload, local_id)

        seq, delta = self._database.write(end)
        self._notes.forget(local_id)
        self._queue.queued("StopTransaction", stop_payload, local_id, seq, delta)

    def note_meter(self, local_id: int, energy_wh: int, ts: str) -> None:
        """Remember the last reading of a running transaction (used after a power loss).

        Written with the transaction's next queued message, or after
        ``note_interval_s`` -- not at every meter poll.
        """
        self._notes.notes[local_id] = (energy_wh, ts)
        self._flush_if_due()
        now = time.monotonic()
        last = self._notes.noted_at.setdefault(local_id, now)
        if now - last >= self._limits.note_interval_s:

            def note(db: sqlite3.Connection) -> None:
                self._notes.write(db, local_id)

            self._database.write(note, durable=False)
            self._notes.noted(local_id, energy_wh, ts)

    def set_csms_id(self, local_id: int, csms_id: int) -> None:
        if self.csms_id(local_id) == csms_id:
            return
        self._database.write(
            lambda db: db.execute(
                "UPDATE transactions SET csms_id = ? WHERE local_id = ?", (csms_id, local_id)
            )
        )

    def csms_id(self, local_id: int) -> int | None:
        row = self._database.db.execute(
            "SELECT csms_id FROM transactions WHERE local_id = ?", (local_id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def id_tag(self, local_id: int) -> str | None:
        row = self._database.db.execute(
            "SELECT id_tag FROM transactions WHERE local_id = ?", (local_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def active(self) -> list[TxRecord]:
        rows = self._database.db.execute(
            "SELECT local_id, connector_id, id_tag, csms_id, meter_start_wh, start_ts,"
            " last_meter_wh, reservation_id FROM transactions WHERE active = 1"
        ).fetchall()
        return [TxRecord(*row) for row in rows]
