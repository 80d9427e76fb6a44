"""The RAM stage of the transaction-message queue: a second SQLite file (on a tmpfs such as
``/run``) that a transaction's MeterValues are committed to instead of the state file. It
survives a SIGKILL or a restart of the agent, not a power cut; what the CSMS has not
acknowledged is moved to the state file once the oldest has waited ``flush_s`` seconds,
with any write that queues a message to the disk, and at exit. A stage that fails hands
what it still holds to the state file and is never read again (the state file's
``stage.owner`` changes in the same commit)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.store.db import (
    Corrupt,
    Database,
    create_private,
    filesystem,
    make_dirs,
    move_aside,
    restrict,
    set_up,
)
from agent.store.tables import get_kv, note_row, put_kv

log = logging.getLogger("evcp.store")

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

#: A queued message's columns, in both files.
COLUMNS = "seq, action, payload, tx_local_id, attempts, failed, last_error, created"


class Foreign(sqlite3.DatabaseError):
    """A stage file another state file left (its messages are not this one's)."""


def open_stage(path: Path, owner: str) -> sqlite3.Connection:
    """Open (or create) the stage file of the state file whose ``stage.owner`` is
    ``owner``. WAL without fsync: a SIGKILL mid-write cannot tear it (the operating system
    holds what was written), and it lives in RAM anyway. It holds a few rows at a time, so
    its WAL is checkpointed every 32 pages (32 KiB of RAM, not SQLite's 1 MiB) and its
    page cache is small."""
    create_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    try:
        set_up(db, new=True, synchronous="OFF")
        db.execute("PRAGMA wal_autocheckpoint=32")
        db.execute("PRAGMA cache_size=32")
        db.executescript(f"BEGIN; {_STAGE_SCHEMA} COMMIT;")
        row = db.execute("SELECT id FROM owner").fetchone()
        if row is None:
            db.execute("INSERT INTO owner (id) VALUES (?)", (owner,))
        elif row[0] != owner:
            raise Foreign("was left by another state file")
        with contextlib.suppress(OSError):  # (SQLite gave its WAL the file's mode anyway)
            restrict(path)
    except (Corrupt, Foreign):
        db.close()
        raise
    except sqlite3.DatabaseError as exc:
        db.close()
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise Corrupt(f"is unreadable: {exc}") from exc
        raise
    return db


class Stage:
    """The stage file and what moves between it and the state file."""

    def __init__(self, database: Database) -> None:
        self._database = database
        #: The RAM file MeterValues are staged in (None: each goes to the disk).
        self.file: sqlite3.Connection | None = None
        self.path: Path | None = None
        #: Seconds a staged MeterValues may wait before it is moved to the disk.
        self.flush_s = 0.0
        #: When the oldest message now in the stage was staged (monotonic), if any.
        self.since: float | None = None
        #: Whether new MeterValues go to the stage (False: it only holds what a run left).
        self.staging = False
        #: What the write in progress moves from the stage, applied after its commit:
        #: (highest staged seq, rescued rows, new stage.owner, readings moved).
        self.moving: tuple[int, int, str | None, bool] | None = None
        #: Messages read from a stage that failed, to be moved to the state file.
        self.rescued: list[tuple[Any, ...]] = []
        #: A new ``stage.owner`` to commit: the stage file in use before must never be
        #: read again.
        self.owner_pending: str | None = None
        #: Count the queue again before the next message is queued (a stage failed).
        self.recount = False

    def discard(self) -> None:
        """A write starts, or failed: it moves nothing (yet)."""
        self.moving = None

    def _put(self, key: str, value: str) -> None:
        def put(db: sqlite3.Connection) -> None:
            put_kv(db, key, value)

        self._database.write(put)

    def start(self, path: Path, flush_s: float) -> bool:
        """The first part of :meth:`agent.store.Store.stage` (which see), up to the count of
        the queue; False when ``path`` cannot be used (every message goes to the disk)."""
        owner = get_kv(self._database.db, "stage.owner")
        if owner is None:
            owner = os.urandom(8).hex()
            self._put("stage.owner", owner)
        try:
            make_dirs(path.parent)
            try:
                stage = open_stage(path, owner)
            except (Corrupt, Foreign) as exc:
                aside = move_aside(path, "aside")
                log.error("MeterValues stage %s %s; moved aside to %s", path, exc, aside)
                stage = open_stage(path, owner)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot stage MeterValues in %s (%s): every queued message is written"
                      " to the disk before it is sent", path, exc)  # fmt: skip
            # Whatever that file holds is never read later, when its seqs may be in use.
            self._put("stage.owner", os.urandom(8).hex())
            return False
        self.file, self.path, self.flush_s = stage, path, flush_s
        self.staging = flush_s > 0
        kind = filesystem(path.parent)
        if self.staging and kind not in (None, "tmpfs", "ramfs"):
            log.warning("MeterValues stage %s is on %s, not in RAM (tmpfs): staging there"
                        " saves no disk writes; set [agent] stage_dir to a tmpfs such as"
                        " /run/evcp", path, kind)  # fmt: skip
        self._forget_moved()
        if not self.empty():
            log.warning("moving the message(s) staged before the agent stopped from %s to the"
                        " state file", path)  # fmt: skip
        self.flush(force=True)
        if not self.empty():  # (the disk refuses writes: moved when it takes them)
            self.since = time.monotonic() - self.flush_s
        return True

    def close_if_unused(self) -> None:
        """The end of :meth:`agent.store.Store.stage`: with staging off and nothing left,
        the stage file is closed and removed."""
        path = self.path
        if not self.staging and self.file is not None and self.empty():
            self.file.close()
            self.file = None
            if path is not None:
                for suffix in ("", "-wal"):
                    path.with_name(path.name + suffix).unlink(missing_ok=True)

    def _forget_moved(self) -> None:
        """Remove from the stage what the state file already has: a SIGKILL between a move's
        commit and the stage's DELETE left them in both. (A write to the stage only: it
        works while the disk refuses writes, when the move at start cannot run.)"""
        if self.file is None:
            return
        try:
            staged = [row[0] for row in self.file.execute("SELECT seq FROM queue")]
            db = self._database.db
            moved = [
                seq
                for seq in staged
                if db.execute("SELECT 1 FROM queue WHERE seq = ?", (seq,)).fetchone()
            ]
            if moved:
                self.file.executemany("DELETE FROM queue WHERE seq = ?", [(s,) for s in moved])
        except sqlite3.Error as exc:
            self.drop(exc)

    def flush(self, *, force: bool = False) -> None:
        """Move every staged message (and reading) to the state file in one durable commit.
        Not while the state lives in memory (a full disk): the stage is the safer place."""
        if not self._database.on_disk:
            return
        if not (self.rescued or self.owner_pending):
            if self.file is None:
                return
            if self.empty() and not force:
                self.since = None
                return
        self._database.write(self.move)

    def flush_if_due(self) -> None:
        """Move the staged messages to the disk once the oldest has waited ``flush_s``; and
        while the state lives in memory, try the disk again when it is time (staged, there
        may be no other write for minutes)."""
        self._database.retry_if_due()
        since = self.since
        if since is not None and time.monotonic() - since >= self.flush_s:
            self.flush()

    def flush_delay(self) -> float | None:
        """Seconds until :meth:`flush_if_due` moves the staged messages (None: none
        staged)."""
        since = self.since
        if since is None:
            return None
        return max(since + self.flush_s - time.monotonic(), 0.0)

    def move(self, db: sqlite3.Connection) -> None:
        """In the write in progress: copy the staged messages and readings (not while the
        state lives in memory), what a failed stage left, and a new ``stage.owner`` into the
        state file. :meth:`committed` removes them from the stage after the commit."""
        staged: list[tuple[Any, ...]] = []
        notes: list[tuple[Any, ...]] = []
        if db is self._database.disk and self.file is not None:
            try:
                staged = self.file.execute(f"SELECT {COLUMNS} FROM queue ORDER BY seq").fetchall()
                notes = self.file.execute("SELECT local_id, wh, ts FROM notes").fetchall()
            except sqlite3.Error as exc:
                self.drop(exc)
                staged, notes = [], []
        rows = self.rescued + staged
        if rows:
            db.executemany(
                f"INSERT OR IGNORE INTO queue ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        for local_id, wh, ts in notes:
            note_row(db, local_id, wh, ts)
        owner = self.owner_pending
        if owner is not None:
            put_kv(db, "stage.owner", owner)
        upto = int(staged[-1][0]) if staged else 0
        self.moving = (upto, len(self.rescued), owner, bool(notes))

    def committed(self) -> None:
        """After a commit: remove from the stage what it moved to the state file. (A
        SIGKILL in between leaves it in both; the next start skips those the state file
        already has -- by seq -- before anything is sent.)"""
        moving, self.moving = self.moving, None
        if moving is None:
            return
        upto, rescued, owner, notes = moving
        del self.rescued[:rescued]
        if owner is not None and owner == self.owner_pending:
            self.owner_pending = None
        if self.file is not None and (upto or notes):
            try:
                if upto:
                    self.file.execute("DELETE FROM queue WHERE seq <= ?", (upto,))
                if notes:
                    self.file.execute("DELETE FROM notes")
            except sqlite3.Error as exc:
                self.drop(exc, moved_upto=upto)
            if self.empty():
                self.since = None
        self._rescue()

    def drop(self, exc: sqlite3.Error, *, moved_upto: int = 0) -> None:
        """The stage failed (its tmpfs is full?): carry on without it. What it still holds
        (above ``moved_upto``, already in the state file) goes to the state file; it is lost
        only if it cannot be read either. The file is never read again."""
        stage, self.file = self.file, None
        self.staging = False
        self.since = None
        self.owner_pending = os.urandom(8).hex()
        log.error("the MeterValues stage %s failed (%s): from now on every queued message is"
                  " written to the disk before it is sent", self.path, exc)  # fmt: skip
        if stage is None:
            return
        try:
            rows = stage.execute(
                f"SELECT {COLUMNS} FROM queue WHERE seq > ? ORDER BY seq", (moved_upto,)
            ).fetchall()
        except sqlite3.Error as again:
            log.error("the messages in the MeterValues stage are lost: %s", again)
            rows = []
        with contextlib.suppress(sqlite3.Error):
            stage.close()
        self.rescued.extend(tuple(row) for row in rows)
        self.recount = True  # (what could not be read is no longer queued)
        path = self.path
        if path is not None:  # never read again, also if the new stage.owner is not on disk
            try:
                move_aside(path, "failed")
            except OSError as cannot:
                log.error("cannot move the failed stage %s aside: %s", path, cannot)
        self._rescue()

    def _rescue(self) -> None:
        """Commit what a failed stage left (and the new ``stage.owner``) -- at once, unless
        a write is in progress: then its :meth:`move` or :meth:`committed` does."""
        if (self.rescued or self.owner_pending) and not self._database.db.in_transaction:
            self._database.write(self.move)

    def empty(self) -> bool:
        if self.file is None:
            return True
        try:
            return self.file.execute("SELECT 1 FROM queue LIMIT 1").fetchone() is None
        except sqlite3.Error as exc:
            self.drop(exc)
            return True

    def max_seq(self) -> int:
        """The highest seq in the stage (or left by a failed one)."""
        top = max((int(row[0]) for row in self.rescued), default=0)
        if self.file is not None:
            try:
                row = self.file.execute("SELECT COALESCE(MAX(seq), 0) FROM queue").fetchone()
                top = max(top, int(row[0]))
            except sqlite3.Error as exc:
                self.drop(exc)
                return self.max_seq()
        return top

    def holds(self, seq: int) -> bool:
        if self.file is None:
            return False
        try:
            row = self.file.execute("SELECT 1 FROM queue WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.Error as exc:
            self.drop(exc)
            return False
        return row is not None

    def execute(self, sql: str, args: tuple[Any, ...]) -> int:
        """One statement on the stage; its change count (-1 when the stage failed: what it
        held is in the state file now)."""
        if self.file is None:
            return -1
        try:
            return int(self.file.execute(sql, args).rowcount)
        except sqlite3.Error as exc:
            self.drop(exc)
            return -1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
