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

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("evcp.store")

T = TypeVar("T")

#: Page size of a new database: small pages keep the bytes written per sample low.
PAGE_SIZE = 1024

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema
    """
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE transactions (
        local_id INTEGER PRIMARY KEY AUTOINCREMENT,
        connector_id INTEGER NOT NULL,
        id_tag TEXT NOT NULL,
        csms_id INTEGER,
        meter_start_wh INTEGER NOT NULL,
        start_ts TEXT NOT NULL,
        reservation_id INTEGER,
        last_meter_wh INTEGER,
        last_meter_ts TEXT,
        stop_ts TEXT,
        meter_stop_wh INTEGER,
        stop_reason TEXT,
        active INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL,
        payload TEXT NOT NULL,
        tx_local_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        created TEXT NOT NULL
    );
    CREATE TABLE auth_cache (
        id_tag TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        expiry TEXT,
        parent_id_tag TEXT
    );
    CREATE TABLE profiles (
        profile_id INTEGER PRIMARY KEY,
        connector_id INTEGER NOT NULL,
        body TEXT NOT NULL
    );
    """,
    # 2: the local authorization list, reservations, cache entry ages; the queue without
    # AUTOINCREMENT (one page less written per message: the order is the rowid's, and a
    # seq is never reused while a message that had it is still queued).
    """
    CREATE TABLE local_list (
        id_tag TEXT PRIMARY KEY COLLATE NOCASE,
        status TEXT NOT NULL,
        expiry TEXT,
        parent_id_tag TEXT
    );
    CREATE TABLE reservations (
        reservation_id INTEGER PRIMARY KEY,
        connector_id INTEGER NOT NULL,
        id_tag TEXT NOT NULL,
        parent_id_tag TEXT,
        expiry TEXT NOT NULL
    );
    ALTER TABLE auth_cache ADD COLUMN updated REAL NOT NULL DEFAULT 0;
    CREATE TABLE queue_v2 (
        seq INTEGER PRIMARY KEY,
        action TEXT NOT NULL,
        payload TEXT NOT NULL,
        tx_local_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        created TEXT NOT NULL
    );
    INSERT INTO queue_v2 SELECT seq, action, payload, tx_local_id, attempts, failed,
        last_error, created FROM queue;
    DROP TABLE queue;
    ALTER TABLE queue_v2 RENAME TO queue;
    """,
)


class StoreInUse(RuntimeError):
    """Another process holds the state file (a second agent on the same state directory)."""


@dataclass(frozen=True, slots=True)
class TxRecord:
    local_id: int
    connector_id: int
    id_tag: str
    csms_id: int | None
    meter_start_wh: int
    start_ts: str
    last_meter_wh: int | None
    reservation_id: int | None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    seq: int
    action: str
    payload: dict[str, Any]
    tx_local_id: int | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AuthEntry:
    """An idTagInfo held locally (cache or local list); ``expiry`` as sent by the CSMS."""

    status: str
    expiry: str | None
    parent_id_tag: str | None


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    reservation_id: int
    connector_id: int
    id_tag: str
    parent_id_tag: str | None
    expiry: str


def pack(payload: dict[str, Any]) -> bytes:
    """A queued message as stored: compact JSON, deflated (a MeterValues shrinks to about a
    third, and fits a page without an overflow page: fewer pages written per sample)."""
    return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 6)


def unpack(stored: bytes | str) -> dict[str, Any]:
    """The payload of a queued message (plain JSON text from schema version 1)."""
    text = zlib.decompress(stored) if isinstance(stored, bytes) else stored
    payload: dict[str, Any] = json.loads(text)
    return payload


def message_time(action: str, payload: dict[str, Any]) -> str:
    """When a transaction message was taken: its timestamp (a MeterValues: its first
    meterValue's)."""
    if "timestamp" in payload:
        return str(payload["timestamp"])
    values = payload.get("meterValue")
    if isinstance(values, list) and values and isinstance(values[0], dict):
        return str(values[0].get("timestamp", ""))
    return ""


class Store:
    """The agent's SQLite database. Create with :meth:`open`; call :meth:`close` at exit."""

    #: Most messages the outbound queue holds before intermediate MeterValues are thinned
    #: (the agent sets it from its configuration).
    max_queue = 100_000
    #: Most entries in the authorization cache (invalid and oldest entries go first).
    cache_max = 1000
    #: Seconds between attempts to write the state back to disk after a write failed.
    disk_retry_s = 60.0
    #: Seconds between writes of a running transaction's last meter reading when no
    #: message of the transaction is queued in between.
    note_interval_s = 300.0

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        #: The state file; None while it could not even be created (a full disk at start).
        self._disk: sqlite3.Connection | None = db
        self._db = db
        self.path = path
        #: Why the state lives in memory only (a write to disk failed); None when on disk.
        self.write_error: str | None = None
        self._disk_retry_at = 0.0
        self._queue_len = int(db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])
        #: Last meter reading per running transaction not yet written: (Wh, timestamp).
        self._notes: dict[int, tuple[int, str]] = {}
        self._noted_at: dict[int, float] = {}
        #: The RAM file MeterValues are staged in (None: each goes to the disk).
        self._stage: sqlite3.Connection | None = None
        self._stage_path: Path | None = None
        #: Seconds a staged MeterValues may wait before it is moved to the disk.
        self._flush_s = 0.0
        #: When the oldest message now in the stage was staged (monotonic), if any.
        self._staged_since: float | None = None
        #: Whether new MeterValues go to the stage (False: it only holds what a run left).
        self._staging = False
        #: What the write in progress moves from the stage, applied after its commit:
        #: (highest staged seq, rescued rows, new stage.owner, readings moved).
        self._moving: tuple[int, int, str | None, bool] | None = None
        #: Messages read from a stage that failed, to be moved to the state file.
        self._rescued: list[tuple[Any, ...]] = []
        #: A new ``stage.owner`` to commit: the stage file in use before must never be
        #: read again.
        self._owner_pending: str | None = None
        #: Count the queue again before the next message is queued (a stage failed).
        self._recount = False

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Open (or create) ``state_dir/evcp.db``; a corrupt file is moved aside."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "evcp.db"
        fresh = not path.exists() or path.stat().st_size == 0
        try:
            db = cls._connect(path)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise StoreInUse(
                    f"state file {path} is in use by another process (is another evcp agent"
                    " running with the same state_dir?)"
                ) from None
            if not fresh or not _disk_trouble(exc):
                raise  # an existing state file is never replaced by an empty one
            return cls._in_memory(path, exc)
        except _Corrupt as exc:
            aside = path.with_name(f"evcp.db.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("state file %s is unreadable (%s); moved aside to %s", path, exc, aside)
            for suffix in ("-wal", "-shm", ""):
                side = path.with_name(path.name + suffix)
                if side.exists():
                    side.rename(aside.with_name(aside.name + suffix))
            try:
                db = cls._connect(path)
            except sqlite3.OperationalError as again:
                if not _disk_trouble(again):
                    raise
                return cls._in_memory(path, again)
        return cls(db, path)

    @classmethod
    def _in_memory(cls, path: Path, exc: sqlite3.Error) -> Store:
        """No state file can be created (a full disk): run on an empty state in memory,
        and keep trying to write it to ``path`` (see :meth:`_back_to_disk`)."""
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        memory.execute(f"PRAGMA page_size={PAGE_SIZE}")
        _migrate(memory)
        store = cls(memory, path)
        store._disk = None
        store._to_memory(exc)
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        new = not path.exists() or path.stat().st_size == 0
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2.0)
        try:
            _set_up(db, new=new, synchronous="FULL")
            _migrate(db)
        except sqlite3.OperationalError:
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            # Corrupt. Copy the files aside before closing: closing checkpoints the WAL
            # into the main file, and the copy must be what was found.
            found = [path.with_name(path.name + suffix) for suffix in ("", "-wal")]
            found = [side for side in found if side.exists()]
            copies = [side.with_name(side.name + ".found") for side in found]
            try:
                for side, copy in zip(found, copies, strict=True):
                    shutil.copyfile(side, copy)
            except OSError as copy_error:  # no room for a copy: keep what closing leaves
                log.error("cannot keep an exact copy of %s: %s", path, copy_error)
                for copy in copies:
                    copy.unlink(missing_ok=True)
                copies = []
            db.close()
            for side, copy in zip(found, copies, strict=False):
                copy.replace(side)
            raise _Corrupt(str(exc)) from exc
        return db

    def close(self) -> None:
        if self._db is not self._disk:
            self._back_to_disk(final=True)
        self.flush_stage(force=True)
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._db is not self._disk:
            self._db.close()
        if self._disk is not None:
            self._disk.close()

    # ------------------------------------------------------------------ writing
    def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in one committed transaction; on a failed disk, carry on in memory."""
        if self._db is not self._disk and time.monotonic() >= self._disk_retry_at:
            self._back_to_disk()
        self._moving = None
        try:
            try:
                result = self._commit(fn, durable=durable)
            except sqlite3.DatabaseError as exc:
                if self._db is not self._disk or not _disk_trouble(exc):
                    raise
                self._to_memory(exc)
                self._moving = None
                result = self._commit(fn, durable=durable)
        except BaseException:
            self._moving = None  # rolled back: nothing was moved
            raise
        self._committed()
        return result

    def _commit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool) -> T:
        db = self._db
        relaxed = not durable and db is self._disk
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        finally:
            if relaxed:
                db.execute("PRAGMA synchronous=FULL")
        return result

    def _to_memory(self, exc: sqlite3.Error) -> None:
        if self._disk is not None:
            memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._disk.backup(memory)
            self._db = memory
        self.write_error = str(exc)
        self._disk_retry_at = time.monotonic() + self.disk_retry_s
        log.error(
            "cannot write the state file %s (%s): the agent carries on with its state in"
            " memory, charging and reporting as usual, but a power loss now loses what was"
            " not written; retrying to write it every %.0f s",
            self.path,
            exc,
            self.disk_retry_s,
        )

    def _back_to_disk(self, *, final: bool = False) -> None:
        try:
            if self._disk is None:
                self._disk = self._connect(self.path)
            self._db.backup(self._disk)
        except sqlite3.Error as exc:
            self._disk_retry_at = time.monotonic() + self.disk_retry_s
            (log.error if final else log.warning)(
                "the state file %s still cannot be written (%s)%s",
                self.path,
                exc,
                ": state since the failure is lost at exit" if final else "",
            )
            return
        self._db.close()
        self._db = self._disk
        self.write_error = None
        log.warning("the state file %s can be written again: state saved to disk", self.path)

    def storage_status(self) -> dict[str, Any]:
        """For ``evcp status``: where the state lives and why."""
        return {
            "path": str(self.path),
            "on_disk": self._db is self._disk,
            "error": self.write_error,
            "stage": None if self._stage is None else str(self._stage_path),
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
        owner = self.get("stage.owner")
        if owner is None:
            owner = os.urandom(8).hex()
            self.put("stage.owner", owner)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                stage = _open_stage(path, owner)
            except (_Corrupt, _Foreign) as exc:
                aside = _move_aside(path, "aside")
                log.error("MeterValues stage %s %s; moved aside to %s", path, exc, aside)
                stage = _open_stage(path, owner)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot stage MeterValues in %s (%s): every queued message is written"
                      " to the disk before it is sent", path, exc)  # fmt: skip
            # Whatever that file holds is never read later, when its seqs may be in use.
            self.put("stage.owner", os.urandom(8).hex())
            return
        self._stage, self._stage_path, self._flush_s = stage, path, flush_s
        self._staging = flush_s > 0
        kind = _filesystem(path.parent)
        if self._staging and kind not in (None, "tmpfs", "ramfs"):
            log.warning("MeterValues stage %s is on %s, not in RAM (tmpfs): staging there"
                        " saves no disk writes; set [agent] stage_dir to a tmpfs such as"
                        " /run/evcp", path, kind)  # fmt: skip
        self._forget_moved()
        if not self._stage_empty():
            log.warning("moving the message(s) staged before the agent stopped from %s to the"
                        " state file", path)  # fmt: skip
        self.flush_stage(force=True)
        if not self._stage_empty():  # (the disk refuses writes: moved when it takes them)
            self._staged_since = time.monotonic() - self._flush_s
        self._queue_len = self._count_queued()
        if not self._staging and self._stage is not None and self._stage_empty():
            self._stage.close()
            self._stage = None
            for suffix in ("", "-wal"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)

    def _forget_moved(self) -> None:
        """Remove from the stage what the state file already has: a SIGKILL between a move's
        commit and the stage's DELETE left them in both. (A write to the stage only: it
        works while the disk refuses writes, when the move at start cannot run.)"""
        if self._stage is None:
            return
        try:
            staged = [row[0] for row in self._stage.execute("SELECT seq FROM queue")]
            moved = [
                seq
                for seq in staged
                if self._db.execute("SELECT 1 FROM queue WHERE seq = ?", (seq,)).fetchone()
            ]
            if moved:
                self._stage.executemany("DELETE FROM queue WHERE seq = ?", [(s,) for s in moved])
        except sqlite3.Error as exc:
            self._drop_stage(exc)

    def flush_stage(self, *, force: bool = False) -> None:
        """Move every staged message (and reading) to the state file in one durable commit.
        Not while the state lives in memory (a full disk): the stage is the safer place."""
        if self._db is not self._disk:
            return
        if not (self._rescued or self._owner_pending):
            if self._stage is None:
                return
            if self._stage_empty() and not force:
                self._staged_since = None
                return
        self._write(self._move_stage)

    def flush_if_due(self) -> None:
        """Move the staged messages to the disk once the oldest has waited ``flush_s``; and
        while the state lives in memory, try the disk again when it is time (staged, there
        may be no other write for minutes)."""
        if self._db is not self._disk and time.monotonic() >= self._disk_retry_at:
            self._back_to_disk()
        since = self._staged_since
        if since is not None and time.monotonic() - since >= self._flush_s:
            self.flush_stage()

    def flush_delay(self) -> float | None:
        """Seconds until :meth:`flush_if_due` moves the staged messages (None: none
        staged)."""
        since = self._staged_since
        if since is None:
            return None
        return max(since + self._flush_s - time.monotonic(), 0.0)

    _STAGE_COLUMNS = "seq, action, payload, tx_local_id, attempts, failed, last_error, created"

    def _move_stage(self, db: sqlite3.Connection) -> None:
        """In the write in progress: copy the staged messages and readings (not while the
        state lives in memory), what a failed stage left, and a new ``stage.owner`` into the
        state file. :meth:`_committed` removes them from the stage after the commit."""
        staged: list[tuple[Any, ...]] = []
        notes: list[tuple[Any, ...]] = []
        if db is self._disk and self._stage is not None:
            try:
                staged = self._stage.execute(
                    f"SELECT {self._STAGE_COLUMNS} FROM queue ORDER BY seq"
                ).fetchall()
                notes = self._stage.execute("SELECT local_id, wh, ts FROM notes").fetchall()
            except sqlite3.Error as exc:
                self._drop_stage(exc)
                staged, notes = [], []
        rows = self._rescued + staged
        if rows:
            db.executemany(
                f"INSERT OR IGNORE INTO queue ({self._STAGE_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        for local_id, wh, ts in notes:
            self._note_row(db, local_id, wh, ts)
        owner = self._owner_pending
        if owner is not None:
            self._put(db, "stage.owner", owner)
        upto = int(staged[-1][0]) if staged else 0
        self._moving = (upto, len(self._rescued), owner, bool(notes))

    def _committed(self) -> None:
        """After a commit: remove from the stage what it moved to the state file. (A
        SIGKILL in between leaves it in both; the next start skips those the state file
        already has -- by seq -- before anything is sent.)"""
        moving, self._moving = self._moving, None
        if moving is None:
            return
        upto, rescued, owner, notes = moving
        del self._rescued[:rescued]
        if owner is not None and owner == self._owner_pending:
            self._owner_pending = None
        if self._stage is not None and (upto or notes):
            try:
                if upto:
                    self._stage.execute("DELETE FROM queue WHERE seq <= ?", (upto,))
                if notes:
                    self._stage.execute("DELETE FROM notes")
            except sqlite3.Error as exc:
                self._drop_stage(exc, moved_upto=upto)
            if self._stage_empty():
                self._staged_since = None
        self._rescue()

    def _drop_stage(self, exc: sqlite3.Error, *, moved_upto: int = 0) -> None:
        """The stage failed (its tmpfs is full?): carry on without it. What it still holds
        (above ``moved_upto``, already in the state file) goes to the state file; it is lost
        only if it cannot be read either. The file is never read again."""
        stage, self._stage = self._stage, None
        self._staging = False
        self._staged_since = None
        self._owner_pending = os.urandom(8).hex()
        log.error("the MeterValues stage %s failed (%s): from now on every queued message is"
                  " written to the disk before it is sent", self._stage_path, exc)  # fmt: skip
        if stage is None:
            return
        try:
            rows = stage.execute(
                f"SELECT {self._STAGE_COLUMNS} FROM queue WHERE seq > ? ORDER BY seq",
                (moved_upto,),
            ).fetchall()
        except sqlite3.Error as again:
            log.error("the messages in the MeterValues stage are lost: %s", again)
            rows = []
        with contextlib.suppress(sqlite3.Error):
            stage.close()
        self._rescued.extend(tuple(row) for row in rows)
        self._recount = True  # (what could not be read is no longer queued)
        path = self._stage_path
        if path is not None:  # never read again, also if the new stage.owner is not on disk
            try:
                _move_aside(path, "failed")
            except OSError as cannot:
                log.error("cannot move the failed stage %s aside: %s", path, cannot)
        self._rescue()

    def _rescue(self) -> None:
        """Commit what a failed stage left (and the new ``stage.owner``) -- at once, unless
        a write is in progress: then its :meth:`_move_stage` or :meth:`_committed` does."""
        if (self._rescued or self._owner_pending) and not self._db.in_transaction:
            self._write(self._move_stage)

    def _stage_empty(self) -> bool:
        if self._stage is None:
            return True
        try:
            return self._stage.execute("SELECT 1 FROM queue LIMIT 1").fetchone() is None
        except sqlite3.Error as exc:
            self._drop_stage(exc)
            return True

    def _stage_max(self) -> int:
        """The highest seq in the stage (or left by a failed one)."""
        top = max((int(row[0]) for row in self._rescued), default=0)
        if self._stage is not None:
            try:
                row = self._stage.execute("SELECT COALESCE(MAX(seq), 0) FROM queue").fetchone()
                top = max(top, int(row[0]))
            except sqlite3.Error as exc:
                self._drop_stage(exc)
                return self._stage_max()
        return top

    def _in_stage(self, seq: int) -> bool:
        if self._stage is None:
            return False
        try:
            row = self._stage.execute("SELECT 1 FROM queue WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.Error as exc:
            self._drop_stage(exc)
            return False
        return row is not None

    def _stage_write(self, sql: str, args: tuple[Any, ...]) -> int:
        """One statement on the stage; its change count (-1 when the stage failed: what it
        held is in the state file now)."""
        if self._stage is None:
            return -1
        try:
            return int(self._stage.execute(sql, args).rowcount)
        except sqlite3.Error as exc:
            self._drop_stage(exc)
            return -1

    def _resync(self) -> None:
        if self._recount:
            self._recount = False
            self._queue_len = self._count_queued() + len(self._rescued)

    def _count_queued(self) -> int:
        count = int(self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])
        if self._stage is not None:
            try:
                count += int(self._stage.execute("SELECT COUNT(*) FROM queue").fetchone()[0])
            except sqlite3.Error as exc:
                self._drop_stage(exc)
                return self._count_queued()
        return count

    # ------------------------------------------------------------------ config and kv
    def config_values(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM config").fetchall())

    def set_config(self, key: str, value: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, value)
            )
        )

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def put(self, key: str, value: str | None) -> None:
        def put(db: sqlite3.Connection) -> None:
            self._put(db, key, value)

        self._write(put)

    @staticmethod
    def _put(db: sqlite3.Connection, key: str, value: str | None) -> None:
        if value is None:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

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
        self._resync()

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
            seq, delta = self._enqueue(db, "StartTransaction", start_payload, local_id)
            return local_id, seq, delta

        local_id, seq, delta = self._write(begin)
        self._queued("StartTransaction", start_payload, local_id, seq, delta)
        return local_id

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
        self._resync()

        def end(db: sqlite3.Connection) -> tuple[int, int]:
            db.execute(
                "UPDATE transactions SET active = 0, meter_stop_wh = ?, stop_ts = ?,"
                " stop_reason = ?, last_meter_wh = ?, last_meter_ts = ? WHERE local_id = ?",
                (meter_stop_wh, stop_ts, reason, meter_stop_wh, stop_ts, local_id),
            )
            return self._enqueue(db, "StopTransaction", stop_payload, local_id)

        seq, delta = self._write(end)
        self._notes.pop(local_id, None)
        self._noted_at.pop(local_id, None)
        self._queued("StopTransaction", stop_payload, local_id, seq, delta)

    def note_meter(self, local_id: int, energy_wh: int, ts: str) -> None:
        """Remember the last reading of a running transaction (used after a power loss).

        Written with the transaction's next queued message, or after
        :attr:`note_interval_s` -- not at every meter poll.
        """
        self._notes[local_id] = (energy_wh, ts)
        self.flush_if_due()
        now = time.monotonic()
        last = self._noted_at.setdefault(local_id, now)
        if now - last >= self.note_interval_s:

            def note(db: sqlite3.Connection) -> None:
                self._write_note(db, local_id)

            self._write(note, durable=False)
            self._noted(local_id, energy_wh, ts)

    def _noted(self, local_id: int, energy_wh: int, ts: str) -> None:
        """The note is committed: forget it, unless a newer one came meanwhile. (Forgotten
        only after the commit: a commit that fails and is redone in memory keeps it.)"""
        if self._notes.get(local_id) == (energy_wh, ts):
            del self._notes[local_id]

    def _write_note(self, db: sqlite3.Connection, local_id: int) -> None:
        note = self._notes.get(local_id)
        self._noted_at[local_id] = time.monotonic()
        if note is not None:
            self._note_row(db, local_id, *note)

    @staticmethod
    def _note_row(db: sqlite3.Connection, local_id: int, energy_wh: int, ts: str) -> None:
        db.execute(
            "UPDATE transactions SET last_meter_wh = MAX(COALESCE(last_meter_wh, 0), ?),"
            " last_meter_ts = ? WHERE local_id = ? AND active = 1",
            (energy_wh, ts, local_id),
        )

    def set_csms_transaction_id(self, local_id: int, csms_id: int) -> None:
        if self.csms_transaction_id(local_id) == csms_id:
            return
        self._write(
            lambda db: db.execute(
                "UPDATE transactions SET csms_id = ? WHERE local_id = ?", (csms_id, local_id)
            )
        )

    def csms_transaction_id(self, local_id: int) -> int | None:
        row = self._db.execute(
            "SELECT csms_id FROM transactions WHERE local_id = ?", (local_id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def transaction_id_tag(self, local_id: int) -> str | None:
        row = self._db.execute(
            "SELECT id_tag FROM transactions WHERE local_id = ?", (local_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def active_transactions(self) -> list[TxRecord]:
        rows = self._db.execute(
            "SELECT local_id, connector_id, id_tag, csms_id, meter_start_wh, start_ts,"
            " last_meter_wh, reservation_id FROM transactions WHERE active = 1"
        ).fetchall()
        return [TxRecord(*row) for row in rows]

    # ------------------------------------------------------------------ outbound queue
    def enqueue(self, action: str, payload: dict[str, Any], tx_local_id: int | None) -> int:
        """Commit one transaction message (with the transaction's last meter reading); a
        MeterValues to the stage when there is one."""
        self._resync()
        if self._staging and action == "MeterValues" and tx_local_id is not None:
            seq = self._enqueue_staged(payload, tx_local_id)
            if seq is not None:
                return seq
        note = self._notes.get(tx_local_id) if tx_local_id is not None else None

        def enqueue(db: sqlite3.Connection) -> tuple[int, int]:
            if note is not None and tx_local_id is not None:
                self._write_note(db, tx_local_id)
            return self._enqueue(db, action, payload, tx_local_id)

        seq, delta = self._write(enqueue)
        if note is not None and tx_local_id is not None:
            self._noted(tx_local_id, *note)
        self._queued(action, payload, tx_local_id, seq, delta)
        return seq

    def _enqueue_staged(self, payload: dict[str, Any], tx_local_id: int) -> int | None:
        """Commit a MeterValues, and the transaction's last reading, to the stage; its seq
        (None: the stage failed)."""
        if self._queue_len >= self.max_queue:
            if self._db is not self._disk:
                return None  # the stage cannot be thinned in place: queued (and thinned) in memory
            self.flush_stage()
            self._queue_len -= self._write(self._thin)
        seq = max(self._next_seq(self._db), self._stage_max() + 1)
        stage = self._stage
        if stage is None:  # (it failed just now)
            return None
        note = self._notes.get(tx_local_id)
        try:
            stage.execute("BEGIN")
            stage.execute(
                "INSERT INTO queue (seq, action, payload, tx_local_id, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (seq, "MeterValues", pack(payload), tx_local_id,
                 message_time("MeterValues", payload)),
            )  # fmt: skip
            if note is not None:
                stage.execute(
                    "INSERT INTO notes (local_id, wh, ts) VALUES (?, ?, ?) ON CONFLICT"
                    " (local_id) DO UPDATE SET wh = MAX(wh, excluded.wh), ts = excluded.ts",
                    (tx_local_id, *note),
                )
            stage.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                stage.execute("ROLLBACK")
            self._drop_stage(exc)
            return None
        self._queued("MeterValues", payload, tx_local_id, seq, 1)
        if self._staged_since is None:
            self._staged_since = time.monotonic()
        self.flush_if_due()
        return seq

    def _queued(
        self, action: str, payload: dict[str, Any], local_id: int | None, seq: int, delta: int
    ) -> None:
        self._queue_len += delta
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "queued %s #%d of transaction %s taken at %s",
                action,
                seq,
                local_id,
                message_time(action, payload),
            )

    def _enqueue(
        self,
        db: sqlite3.Connection,
        action: str,
        payload: dict[str, Any],
        tx_local_id: int | None,
    ) -> tuple[int, int]:
        """Insert a message (thinning first when full); return ``(seq, queue length
        change)``."""
        self._move_stage(db)  # staged MeterValues go to the disk with it
        delta = 1
        if self._queue_len >= self.max_queue:
            delta -= self._thin(db)
        seq = max(self._next_seq(db), self._stage_max() + 1)
        db.execute(
            "INSERT INTO queue (seq, action, payload, tx_local_id, created) VALUES (?, ?, ?, ?, ?)",
            (seq, action, pack(payload), tx_local_id, message_time(action, payload)),
        )
        return seq, delta

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM queue").fetchone()[0]) + 1

    _CANDIDATES = (
        "WITH m AS (SELECT seq, tx_local_id, created, LAG(seq) OVER w AS prev,"
        " LEAD(seq) OVER w AS next, LAG(created) OVER w AS prev_at,"
        " LEAD(created) OVER w AS next_at FROM queue"
        " WHERE action = 'MeterValues' AND failed = 0 AND tx_local_id IS NOT NULL"
        " WINDOW w AS (PARTITION BY tx_local_id ORDER BY seq))"
        " SELECT seq, prev, next, tx_local_id, created FROM m"
        " WHERE prev IS NOT NULL AND next IS NOT NULL"
        " ORDER BY COALESCE(julianday(next_at) - julianday(prev_at), 0), next - prev, seq"
        " LIMIT ?"
    )

    def _thin(self, db: sqlite3.Connection) -> int:
        """Make room by dropping intermediate MeterValues -- never the first or last
        queued of a transaction, never a StartTransaction or StopTransaction -- and count
        and log the drops.

        The samples dropped are the ones whose neighbours are closest in time: the
        resolution of a long outage coarsens evenly over all of it, instead of a hole
        growing at its start. A large queue drops 1 % at once (one query per hundred
        messages, not one per message). Returns how many were dropped."""
        batch = max(1, self.max_queue // 100)
        rows = db.execute(self._CANDIDATES, (batch * 3,)).fetchall()
        picked: list[tuple[int, int, str]] = []
        blocked: set[int] = set()
        for seq, prev, nxt, local_id, created in rows:
            if seq in blocked:
                continue
            picked.append((seq, local_id, created))
            blocked.update((prev, seq, nxt))  # keep each dropped sample's neighbours
            if len(picked) == batch:
                break
        if not picked:
            log.error(
                "outbound queue is full (%d) and holds nothing that may be dropped:"
                " keeping every message",
                self.max_queue,
            )
            return 0
        db.executemany("DELETE FROM queue WHERE seq = ?", [(seq,) for seq, _, _ in picked])
        dropped = int(self._get(db, "queue.dropped") or 0) + len(picked)
        self._put(db, "queue.dropped", str(dropped))
        taken = sorted(created for _, _, created in picked)
        transactions = ", ".join(str(t) for t in sorted({local for _, local, _ in picked}))
        if len(picked) == 1:
            what = f"the MeterValues taken at {taken[0]}"
        else:
            what = f"{len(picked)} MeterValues taken from {taken[0]} to {taken[-1]}"
        log.warning(
            "outbound queue full (%d messages): dropped %s of transaction %s (%d dropped so far)",
            self.max_queue,
            what,
            transactions,
            dropped,
        )
        return len(picked)

    def queue_dropped(self) -> int:
        return int(self.get("queue.dropped") or 0)

    def queue_head(self) -> QueuedMessage | None:
        """The next message to send: the lowest seq pending in the state file or the
        stage."""
        head = "SELECT seq, action, payload, tx_local_id, attempts FROM queue WHERE failed = 0 ORDER BY seq LIMIT 1"  # fmt: skip
        while True:
            row = self._db.execute(head).fetchone()
            if self._stage is not None:
                try:
                    staged = self._stage.execute(head).fetchone()
                except sqlite3.Error as exc:
                    self._drop_stage(exc)
                    continue
                if staged is not None and (row is None or staged[0] < row[0]):
                    row = staged
            if row is None:
                return None
            try:
                payload = unpack(row[2])
                if not isinstance(payload, dict):
                    raise ValueError("not a JSON object")
            except (zlib.error, ValueError, TypeError, RecursionError) as exc:
                # Bit rot the integrity check cannot see (it does not read inside values):
                # kept, visible as failed; the queue behind it moves on.
                log.error("queued %s #%d is unreadable in the state file (%s: %s); kept as"
                          " failed", row[1], row[0], type(exc).__name__, exc)  # fmt: skip
                why = f"unreadable: {type(exc).__module__}.{type(exc).__name__}"
                self.queue_attempt(row[0], why, give_up=True)
                continue
            return QueuedMessage(row[0], row[1], payload, row[3], row[4])

    def queue_done(self, seq: int) -> None:
        """The message was answered with a CALLRESULT: remove it."""
        if self._in_stage(seq):
            removed = self._stage_write("DELETE FROM queue WHERE seq = ?", (seq,))
            if removed >= 0:
                self._queue_len -= removed
                if self._stage_empty():
                    self._staged_since = None
                return
        # (When the stage failed just now, what it held is in the state file: removed there.)
        removed = self._write(
            lambda db: db.execute("DELETE FROM queue WHERE seq = ?", (seq,)).rowcount,
            durable=False,
        )
        self._queue_len -= removed

    def start_delivered(self, seq: int, local_id: int, csms_id: int) -> None:
        """StartTransaction answered: record the CSMS id and dequeue it in one commit."""

        def delivered(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE transactions SET csms_id = ? WHERE local_id = ?", (csms_id, local_id)
            )
            return int(db.execute("DELETE FROM queue WHERE seq = ?", (seq,)).rowcount)

        self._queue_len -= self._write(delivered)

    def queue_attempt(self, seq: int, error: str, *, give_up: bool) -> None:
        if self._in_stage(seq):
            changed = self._stage_write(
                "UPDATE queue SET attempts = attempts + 1, last_error = ?, failed = ?"
                " WHERE seq = ?",
                (error, 1 if give_up else 0, seq),
            )
            if changed >= 0:
                if give_up:
                    self.flush_stage()  # a message given up on is kept, on disk
                return
        self._write(
            lambda db: db.execute(
                "UPDATE queue SET attempts = attempts + 1, last_error = ?, failed = ?"
                " WHERE seq = ?",
                (error, 1 if give_up else 0, seq),
            ),
            durable=give_up,
        )

    def queue_retry_failed(self) -> int:
        """Put every message given up on back in the queue, in its place (``evcp queue
        retry``): each gets TransactionMessageAttempts new tries. Returns how many."""
        retry = "UPDATE queue SET failed = 0, attempts = 0 WHERE failed = 1"
        staged = max(self._stage_write(retry, ()), 0)
        return staged + int(self._write(lambda db: db.execute(retry).rowcount))

    def queue_counts(self) -> tuple[int, int]:
        """Return ``(pending, failed)``."""
        counts = "SELECT COALESCE(SUM(failed = 0), 0), COALESCE(SUM(failed = 1), 0) FROM queue"
        row = self._db.execute(counts).fetchone()
        pending, failed = int(row[0]), int(row[1])
        if self._stage is not None:
            try:
                staged = self._stage.execute(counts).fetchone()
            except sqlite3.Error as exc:
                self._drop_stage(exc)
                return self.queue_counts()
            pending, failed = pending + int(staged[0]), failed + int(staged[1])
        return pending, failed

    def queue_failed(self) -> list[tuple[int, str, int | None, str, str | None]]:
        """Messages given up on: ``(seq, action, local transaction, taken at, last error)``."""
        failed = "SELECT seq, action, tx_local_id, created, last_error FROM queue WHERE failed = 1"
        rows = self._db.execute(failed).fetchall()
        if self._stage is not None:  # (one given up on while the state lives in memory)
            try:
                rows += self._stage.execute(failed).fetchall()
            except sqlite3.Error as exc:
                self._drop_stage(exc)
                return self.queue_failed()
        return sorted((int(r[0]), str(r[1]), r[2], str(r[3]), r[4]) for r in rows)

    # ------------------------------------------------------------------ auth cache
    def cache_put(
        self, id_tag: str, status: str, expiry: str | None, parent_id_tag: str | None
    ) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM auth_cache WHERE id_tag = ? COLLATE NOCASE", (id_tag,))
            db.execute(
                "INSERT INTO auth_cache (id_tag, status, expiry, parent_id_tag, updated)"
                " VALUES (?, ?, ?, ?, ?)",
                (id_tag, status, expiry, parent_id_tag, time.time()),
            )
            excess = db.execute("SELECT COUNT(*) FROM auth_cache").fetchone()[0] - self.cache_max
            if excess > 0:
                # Entries that do not authorize go first, then the least recently updated.
                db.execute(
                    "DELETE FROM auth_cache WHERE id_tag IN (SELECT id_tag FROM auth_cache"
                    " ORDER BY status = 'Accepted', updated LIMIT ?)",
                    (excess,),
                )

        self._write(put, durable=False)

    def cache_get(self, id_tag: str) -> tuple[str, str | None, str | None] | None:
        row = self._db.execute(
            "SELECT status, expiry, parent_id_tag FROM auth_cache WHERE id_tag = ? COLLATE NOCASE",
            (id_tag,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def cache_clear(self) -> None:
        self._write(lambda db: db.execute("DELETE FROM auth_cache"))

    # ------------------------------------------------------------------ local auth list
    def local_list_version(self) -> int:
        return int(self.get("local_list.version") or 0)

    def local_list_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM local_list").fetchone()[0])

    def local_list_get(self, id_tag: str) -> AuthEntry | None:
        row = self._db.execute(
            "SELECT status, expiry, parent_id_tag FROM local_list WHERE id_tag = ?", (id_tag,)
        ).fetchone()
        return None if row is None else AuthEntry(row[0], row[1], row[2])

    def local_list_entries(self) -> dict[str, AuthEntry]:
        rows = self._db.execute(
            "SELECT id_tag, status, expiry, parent_id_tag FROM local_list ORDER BY id_tag"
        ).fetchall()
        return {r[0]: AuthEntry(r[1], r[2], r[3]) for r in rows}

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

        def update(db: sqlite3.Connection) -> bool:
            if full:
                db.execute("DELETE FROM local_list")
            for id_tag, entry in entries:
                if entry is None:
                    db.execute("DELETE FROM local_list WHERE id_tag = ?", (id_tag,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO local_list VALUES (?, ?, ?, ?)",
                        (id_tag, entry.status, entry.expiry, entry.parent_id_tag),
                    )
            if db.execute("SELECT COUNT(*) FROM local_list").fetchone()[0] > max_size:
                raise _TooLarge
            self._put(db, "local_list.version", str(version))
            return True

        try:
            return self._write(update)
        except _TooLarge:
            return False

    # ------------------------------------------------------------------ reservations
    def reservations(self) -> list[ReservationRecord]:
        rows = self._db.execute(
            "SELECT reservation_id, connector_id, id_tag, parent_id_tag, expiry"
            " FROM reservations ORDER BY reservation_id"
        ).fetchall()
        return [ReservationRecord(*row) for row in rows]

    def put_reservation(self, r: ReservationRecord) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?)",
                (r.reservation_id, r.connector_id, r.id_tag, r.parent_id_tag, r.expiry),
            )
        )

    def delete_reservation(self, reservation_id: int) -> None:
        self._write(
            lambda db: db.execute(
                "DELETE FROM reservations WHERE reservation_id = ?", (reservation_id,)
            )
        )

    # ------------------------------------------------------------------ charging profiles
    def profiles(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT body FROM profiles ORDER BY profile_id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def put_profile(self, profile_id: int, connector_id: int, body: dict[str, Any]) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?)",
                (profile_id, connector_id, json.dumps(body)),
            )
        )

    def delete_profile(self, profile_id: int) -> None:
        self._write(
            lambda db: db.execute("DELETE FROM profiles WHERE profile_id = ?", (profile_id,))
        )


#: SQLite result codes that mean the file cannot be written (not a mistake in a query).
_DISK_TROUBLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN",
                 "SQLITE_CORRUPT", "SQLITE_NOTADB")  # fmt: skip


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the schema up to date, one committed step per version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")


_STAGE_SCHEMA = """
    CREATE TABLE IF NOT EXISTS queue (
        seq INTEGER PRIMARY KEY,
        action TEXT NOT NULL,
        payload BLOB NOT NULL,
        tx_local_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        created TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS notes (
        local_id INTEGER PRIMARY KEY,
        wh INTEGER NOT NULL,
        ts TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS owner (id TEXT NOT NULL);
"""


def _move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` (and its WAL) to ``<name>.<why>-<time>``; return the new path."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    return aside


def _filesystem(path: Path) -> str | None:
    """The type of the file system ``path`` is on (from /proc/self/mountinfo: the longest
    mount point that contains it); None if that cannot be read."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        where = path.resolve()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = Path(parts[4].encode().decode("unicode_escape"))  # spaces are \040
        if where == point or point in where.parents:
            depth = len(point.parts)
            if best is None or depth >= best[0]:
                best = (depth, rest.split()[0])
    return None if best is None else best[1]


def _set_up(db: sqlite3.Connection, *, new: bool, synchronous: str) -> None:
    """One writer holding the file (no shared-memory index), WAL, and the integrity check
    (a file that fails it raises :class:`_Corrupt`). ``page_size`` only takes on a new
    file."""
    if new:
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    result = db.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise _Corrupt(f"fails its integrity check: {result}")


def _open_stage(path: Path, owner: str) -> sqlite3.Connection:
    """Open (or create) the stage file of the state file whose ``stage.owner`` is
    ``owner``. WAL without fsync: a SIGKILL mid-write cannot tear it (the operating system
    holds what was written), and it lives in RAM anyway. It holds a few rows at a time, so
    its WAL is checkpointed every 32 pages (32 KiB of RAM, not SQLite's 1 MiB) and its
    page cache is small."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    try:
        _set_up(db, new=True, synchronous="OFF")
        db.execute("PRAGMA wal_autocheckpoint=32")
        db.execute("PRAGMA cache_size=32")
        db.executescript(f"BEGIN; {_STAGE_SCHEMA} COMMIT;")
        row = db.execute("SELECT id FROM owner").fetchone()
        if row is None:
            db.execute("INSERT INTO owner (id) VALUES (?)", (owner,))
        elif row[0] != owner:
            raise _Foreign("was left by another state file")
    except (_Corrupt, _Foreign):
        db.close()
        raise
    except sqlite3.DatabaseError as exc:
        db.close()
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise _Corrupt(f"is unreadable: {exc}") from exc
        raise
    return db


class _Foreign(sqlite3.DatabaseError):
    """A stage file another state file left (its messages are not this one's)."""


class _Corrupt(sqlite3.DatabaseError):
    """The state file is not a database, or fails its integrity check."""


def _disk_trouble(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_DISK_TROUBLE)


class _TooLarge(Exception):
    """Rolls back a local list update that would exceed the maximum size."""
