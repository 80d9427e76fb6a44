"""Durable state in one SQLite file (WAL): configuration keys, transactions, the outbound
transaction-message queue, the authorization cache, the local authorization list,
reservations and charging profiles.

One writer (the agent's event loop), one connection, held in exclusive locking mode (no
shared-memory index file is written, and a second agent on the same state directory is
refused with a clear message). Every write is its own committed transaction:

- a transaction message (and every other state change) is committed with
  ``synchronous=FULL`` -- on disk -- before it is first sent, so neither a SIGKILL nor a
  power cut loses it (a MeterValues goes to the stage instead when there is one: below);
- its removal after the CALLRESULT is committed without waiting for the disk
  (``synchronous=NORMAL``, the next FULL commit makes it durable): a SIGKILL cannot undo it
  (the WAL is in the operating system's cache), and an operating-system crash in the few
  seconds before it reaches the disk at worst sends the message once more, unchanged --
  the same duplicate a CSMS sees when a connection drops before a CALLRESULT arrives.

The last meter reading of a running transaction is written with the transaction's
messages (and at most every :attr:`Store.note_interval_s` otherwise), not at every meter
poll: flash wear. Schema changes are numbered migrations (``PRAGMA user_version``). A file
SQLite cannot read is moved aside with a timestamp suffix, never truncated, and a fresh one
is started.

With a *stage* (:meth:`Store.stage`; the agent's default, ``[agent] queue_flush_s`` = 10),
a transaction's MeterValues are committed to a second SQLite file in RAM (``/run``)
instead: it survives a SIGKILL or a restart of the agent, not a power cut. A sample the
CSMS acknowledges is removed from there and never written to the disk; those still
unacknowledged (offline) are moved to the state file once the oldest has waited
``queue_flush_s`` seconds, with any StartTransaction or StopTransaction (which go to the
disk directly, as always), and at exit. A power cut then loses at most samples of the last
``queue_flush_s`` seconds that the CSMS has not acknowledged. Sequence
numbers are one series across both files and the head of the queue is the lowest of the
two, so the order of delivery is kept. The transaction's last meter reading is staged
with each sample too (a restart after a crash finds it there). While the state lives in
memory (a full disk), staged messages stay in the stage: it is the safer place. A stage
that fails hands what it still holds to the state file, and is never read again (the
state file's ``stage.owner`` changes in the same commit).

When a write fails (a full disk, an I/O error), the store logs one clear line, copies the
state into memory and carries on there -- charging and reporting continue, and the queue
still drains -- and tries to write it all back to disk every :attr:`Store.disk_retry_s`
seconds. Until then a power loss loses what was not written; :attr:`Store.write_error`
says so (``evcp status`` shows it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.store.db import MIGRATIONS, PAGE_SIZE, Database, StoreInUse, connect, open_state
from agent.store.queue import MessageQueue, QueuedMessage, message_time, pack, unpack
from agent.store.stage import Stage
from agent.store.tables import (
    AuthCache,
    AuthEntry,
    LocalList,
    MeterNotes,
    Profiles,
    ReservationRecord,
    Reservations,
    Settings,
    StagedLocalList,
    StagingFailed,
    TxRecord,
)
from agent.store.transactions import Transactions

__all__ = [
    "MIGRATIONS",
    "PAGE_SIZE",
    "AuthEntry",
    "QueuedMessage",
    "ReservationRecord",
    "StagedLocalList",
    "StagingFailed",
    "Store",
    "StoreInUse",
    "TxRecord",
    "message_time",
    "pack",
    "unpack",
]

T = TypeVar("T")


class Store:
    """The agent's SQLite database. Create with :meth:`open`; call :meth:`close` at exit.

    A facade: each concern is a part of its own, all writing through one
    :class:`~agent.store.db.Database` -- the queue (:class:`~agent.store.queue.MessageQueue`)
    with its RAM :class:`~agent.store.stage.Stage`, the transactions
    (:class:`~agent.store.transactions.Transactions`) and the small tables
    (:mod:`agent.store.tables`). The limits below are read by the parts when used, so
    setting them here (on the class or on one store) takes effect at once."""

    #: Most messages the outbound queue holds before intermediate MeterValues are thinned
    #: (the agent sets it from its configuration).
    max_queue = 100_000
    #: Most entries in the authorization cache (invalid and oldest entries go first).
    cache_max = 1000
    #: Seconds between attempts to write the state back to disk after a write failed.
    disk_retry_s = 60.0
    #: Called (with the error) when the disk refuses writes and the state moves to memory:
    #: the agent records it as a MemoryExhaustion security event.
    on_disk_full: Callable[[str], None] = staticmethod(lambda error: None)
    #: Seconds between writes of a running transaction's last meter reading when no
    #: message of the transaction is queued in between.
    note_interval_s = 300.0

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        database = Database(db, path, self)
        stage = Stage(database)
        notes = MeterNotes()
        self._database = database
        self._stager = stage
        self._queue = MessageQueue(database, stage, notes, self)
        self._transactions = Transactions(database, self._queue, notes, self, self.flush_if_due)
        self._settings = Settings(database)
        self._auth_cache = AuthCache(database, self)
        self._local_list = LocalList(database)
        self._reservations = Reservations(database)
        self._profiles = Profiles(database)
        database.discard = stage.discard
        database.committed = self._after_commit

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Open (or create) ``state_dir/evcp.db``; a corrupt file is moved aside. When no
        state file can be created (a full disk), run on an empty state in memory and keep
        trying to write it to the file."""
        db, path, trouble = open_state(state_dir)
        store = cls(db, path)
        if trouble is not None:
            store._database.disk = None
            store._database.to_memory(trouble)
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        return connect(path)

    def close(self) -> None:
        database = self._database
        if not database.on_disk:
            database.back_to_disk(final=True)
        self.flush_stage(force=True)
        self._stager.close()
        database.close()

    # ------------------------------------------------------------------ writing
    def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in one committed transaction; on a failed disk, carry on in memory."""
        return self._database.write(fn, durable=durable)

    def _after_commit(self) -> None:
        self._committed()  # (looked up on each commit: a test may replace it)

    def _committed(self) -> None:
        """After a commit: remove from the stage what it moved to the state file."""
        self._stager.committed()

    # The state tests reach into (kept where they reach).
    @property
    def path(self) -> Path:
        return self._database.path

    @property
    def write_error(self) -> str | None:
        """Why the state lives in memory only (a write to disk failed); None when on disk."""
        return self._database.write_error

    @write_error.setter
    def write_error(self, value: str | None) -> None:
        self._database.write_error = value

    @property
    def _db(self) -> sqlite3.Connection:
        return self._database.db

    @property
    def _disk(self) -> sqlite3.Connection | None:
        return self._database.disk

    @_disk.setter
    def _disk(self, value: sqlite3.Connection | None) -> None:
        self._database.disk = value

    @property
    def _disk_retry_at(self) -> float:
        return self._database.retry_at

    @_disk_retry_at.setter
    def _disk_retry_at(self, value: float) -> None:
        self._database.retry_at = value

    @property
    def _stage(self) -> sqlite3.Connection | None:
        return self._stager.file

    @_stage.setter
    def _stage(self, value: sqlite3.Connection | None) -> None:
        self._stager.file = value

    @property
    def _staged_since(self) -> float | None:
        return self._stager.since

    @_staged_since.setter
    def _staged_since(self, value: float | None) -> None:
        self._stager.since = value

    @property
    def _moving(self) -> tuple[int, int, str | None, bool] | None:
        return self._stager.moving

    def storage_status(self) -> dict[str, Any]:
        """For ``evcp status``: where the state lives and why."""
        stage = self._stager
        return {
            "path": str(self.path),
            "on_disk": self._database.on_disk,
            "error": self.write_error,
            "stage": None if stage.file is None else str(stage.path),
            # where it really is: `evcp status` says "in RAM" only on a tmpfs
            **({} if stage.file is None else {"stage_filesystem": stage.filesystem}),
        }

    # ------------------------------------------------------------------ the stage (RAM)
    def stage(self, path: Path, flush_s: float) -> None:
        """Stage transactions' MeterValues in ``path`` (a file on a tmpfs such as /run), and
        move those not yet acknowledged to the state file once the oldest has waited
        ``flush_s`` seconds (:meth:`flush_if_due`, :meth:`flush_delay`).

        Messages a previous run left there (it was killed) are moved to the state file at
        once; with ``flush_s`` 0 that is all (staging was turned off since), and the file is
        removed. A stage file that is unreadable, or not this state file's, is moved aside
        with a log line; when ``path`` cannot be used at all, every message goes to the disk
        as without a stage."""
        if self._stager.start(path, flush_s):
            self._queue.recount()
            self._stager.close_if_unused()

    def flush_stage(self, *, force: bool = False) -> None:
        """Move every staged message (and reading) to the state file in one durable commit.
        Not while the state lives in memory (a full disk): the stage is the safer place."""
        self._stager.flush(force=force)

    def flush_if_due(self) -> None:
        """Move the staged messages to the disk once the oldest has waited ``flush_s``; and
        while the state lives in memory, try the disk again when it is time."""
        self._stager.flush_if_due()

    def flush_delay(self) -> float | None:
        """Seconds until :meth:`flush_if_due` moves the staged messages (None: none
        staged)."""
        return self._stager.flush_delay()

    # ------------------------------------------------------------------ config and kv
    def config_values(self) -> dict[str, str]:
        return self._settings.config_values()

    def set_config(self, key: str, value: str) -> None:
        self._settings.set_config(key, value)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._settings.get(key, default)

    def put(self, key: str, value: str | None) -> None:
        self._settings.put(key, value)

    # ------------------------------------------------------------------ transactions
    def begin_transaction(
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
        return self._transactions.begin(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start_wh=meter_start_wh,
            start_ts=start_ts,
            reservation_id=reservation_id,
            start_payload=start_payload,
        )

    def end_transaction(
        self,
        local_id: int,
        *,
        meter_stop_wh: int,
        stop_ts: str,
        reason: str,
        stop_payload: dict[str, Any],
    ) -> None:
        """Close a transaction and queue its StopTransaction in one commit."""
        self._transactions.end(
            local_id,
            meter_stop_wh=meter_stop_wh,
            stop_ts=stop_ts,
            reason=reason,
            stop_payload=stop_payload,
        )

    def note_meter(self, local_id: int, energy_wh: int, ts: str) -> None:
        """Remember the last reading of a running transaction (used after a power loss):
        written with the transaction's next queued message, or after
        :attr:`note_interval_s` -- not at every meter poll."""
        self._transactions.note_meter(local_id, energy_wh, ts)

    def set_csms_transaction_id(self, local_id: int, csms_id: int) -> None:
        self._transactions.set_csms_id(local_id, csms_id)

    def csms_transaction_id(self, local_id: int) -> int | None:
        return self._transactions.csms_id(local_id)

    def transaction_id_tag(self, local_id: int) -> str | None:
        return self._transactions.id_tag(local_id)

    def active_transactions(self) -> list[TxRecord]:
        return self._transactions.active()

    def integrity_check(self) -> str:
        """``PRAGMA quick_check`` of the state file, through the agent's own connection
        (it holds the file's lock): "ok", or what is wrong."""
        if not self._database.on_disk:
            return "not checked: the state is in memory (the disk refused writes)"
        try:
            rows = self._database.db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            return f"the check failed: {exc}"
        return "; ".join(str(row[0]) for row in rows)

    def recent_transactions(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` transactions, newest first, for ``evcp tx``: each with
        whether the CSMS has all its messages (``delivered``)."""
        waiting = self._queue.undelivered_transactions()
        out = []
        for row in self._transactions.recent(count):
            local_id, connector, tag, csms_id, start_wh, start, stop_wh, stop, reason, active = row
            out.append(
                {
                    "transaction_id": csms_id,
                    "local_id": local_id,
                    "connector_id": connector,
                    "id_tag": tag,
                    "meter_start_wh": start_wh,
                    "meter_stop_wh": stop_wh,
                    "started": start,
                    "stopped": stop,
                    "reason": reason,
                    "running": bool(active),
                    "delivered": csms_id is not None and not active and local_id not in waiting,
                }
            )
        return out

    # ------------------------------------------------------------------ outbound queue
    def enqueue(self, action: str, payload: dict[str, Any], tx_local_id: int | None) -> int:
        """Commit one transaction message (with the transaction's last meter reading); a
        MeterValues to the stage when there is one."""
        return self._queue.enqueue(action, payload, tx_local_id)

    def queue_dropped(self) -> int:
        return self._queue.dropped()

    def queue_head(self) -> QueuedMessage | None:
        """The next message to send: the lowest seq pending in the state file or the
        stage."""
        return self._queue.head()

    def queue_done(self, seq: int) -> None:
        """The message was answered with a CALLRESULT: remove it."""
        self._queue.done(seq)

    def start_delivered(self, seq: int, local_id: int, csms_id: int) -> None:
        """StartTransaction answered: record the CSMS id and dequeue it in one commit."""
        self._queue.start_delivered(seq, local_id, csms_id)

    def queue_attempt(self, seq: int, error: str, *, give_up: bool) -> None:
        self._queue.attempt(seq, error, give_up=give_up)

    def queue_retry_failed(self) -> int:
        """Put every message given up on back in the queue, in its place (``evcp queue
        retry``). Returns how many."""
        return self._queue.retry_failed()

    def queue_counts(self) -> tuple[int, int]:
        """Return ``(pending, failed)``."""
        return self._queue.counts()

    def queue_failed(self) -> list[tuple[int, str, int | None, str, str | None]]:
        """Messages given up on: ``(seq, action, local transaction, taken at, last error)``."""
        return self._queue.failed()

    # ------------------------------------------------------------------ auth cache
    def cache_put(
        self, id_tag: str, status: str, expiry: str | None, parent_id_tag: str | None
    ) -> None:
        self._auth_cache.put(id_tag, status, expiry, parent_id_tag)

    def cache_get(self, id_tag: str) -> tuple[str, str | None, str | None] | None:
        return self._auth_cache.get(id_tag)

    def cache_clear(self) -> None:
        self._auth_cache.clear()

    # ------------------------------------------------------------------ local auth list
    def local_list_version(self) -> int:
        return self._local_list.version()

    def local_list_size(self) -> int:
        return self._local_list.size()

    def local_list_get(self, id_tag: str) -> AuthEntry | None:
        return self._local_list.get(id_tag)

    def local_list_entries(self) -> dict[str, AuthEntry]:
        return self._local_list.entries()

    def local_list_update(
        self,
        *,
        version: int,
        full: bool,
        entries: list[tuple[str, AuthEntry | None]],
        max_size: int,
    ) -> bool:
        """Apply a SendLocalList in one commit (``None`` removes the idTag). Returns False,
        changing nothing, when the list would exceed ``max_size``."""
        return self._local_list.update(
            version=version, full=full, entries=entries, max_size=max_size
        )

    def local_list_stage(self, *, full: bool) -> StagedLocalList:
        """Start a SendLocalList written in steps: the entries go to a temporary table in
        short commits, then :meth:`StagedLocalList.apply` replaces (``full``) or updates
        the list in one; until then every read sees the list as it was. Call
        :meth:`StagedLocalList.close` in all cases."""
        return self._local_list.stage(full=full)

    # ------------------------------------------------------------------ reservations
    def reservations(self) -> list[ReservationRecord]:
        return self._reservations.all()

    def put_reservation(self, r: ReservationRecord) -> None:
        self._reservations.put(r)

    def delete_reservation(self, reservation_id: int) -> None:
        self._reservations.delete(reservation_id)

    # ------------------------------------------------------------------ charging profiles
    def profiles(self) -> list[dict[str, Any]]:
        return self._profiles.all()

    def put_profile(self, profile_id: int, connector_id: int, body: dict[str, Any]) -> None:
        self._profiles.put(profile_id, connector_id, body)

    def delete_profile(self, profile_id: int) -> None:
        self._profiles.delete(profile_id)
