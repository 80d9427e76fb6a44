"""Durable state in one SQLite file (WAL): configuration keys, transactions, the outbound
transaction-message queue, the authorization cache and charging profiles.

One writer (the agent's event loop). Every write is its own committed transaction with
``synchronous=FULL``: a message is on disk before it is first sent, and a SIGKILL or power
loss at any instant loses nothing that was committed. Schema changes are numbered
migrations (``PRAGMA user_version``). A file SQLite cannot read is moved aside with a
timestamp suffix, never truncated, and a fresh one is started.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("evcp.store")

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
)


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


class Store:
    """The agent's SQLite database. Create with :meth:`open`; call :meth:`close` at exit."""

    #: Most messages the outbound queue holds before intermediate MeterValues are thinned.
    max_queue = 100_000

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Open (or create) ``state_dir/evcp.db``; a corrupt file is moved aside."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "evcp.db"
        try:
            db = cls._connect(path)
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"evcp.db.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("state file %s is unreadable (%s); moved aside to %s", path, exc, aside)
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                side = path.with_name(path.name + suffix)
                if side.exists():
                    side.rename(aside.with_name(aside.name + suffix))
            db = cls._connect(path)
        return cls(db, path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            result = db.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {result}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ config and kv
    def config_values(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM config").fetchall())

    def set_config(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, value))

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def put(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

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
        with self._tx() as db:
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
            self._enqueue(db, "StartTransaction", start_payload, local_id, start_ts)
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
        with self._tx() as db:
            db.execute(
                "UPDATE transactions SET active = 0, meter_stop_wh = ?, stop_ts = ?,"
                " stop_reason = ? WHERE local_id = ?",
                (meter_stop_wh, stop_ts, reason, local_id),
            )
            self._enqueue(db, "StopTransaction", stop_payload, local_id, stop_ts)

    def note_meter(self, local_id: int, energy_wh: int, ts: str) -> None:
        """Remember the last reading of a running transaction (used after a power loss)."""
        self._db.execute(
            "UPDATE transactions SET last_meter_wh = ?, last_meter_ts = ? WHERE local_id = ?",
            (energy_wh, ts, local_id),
        )

    def set_csms_transaction_id(self, local_id: int, csms_id: int) -> None:
        self._db.execute(
            "UPDATE transactions SET csms_id = ? WHERE local_id = ?", (csms_id, local_id)
        )

    def csms_transaction_id(self, local_id: int) -> int | None:
        row = self._db.execute(
            "SELECT csms_id FROM transactions WHERE local_id = ?", (local_id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def active_transactions(self) -> list[TxRecord]:
        rows = self._db.execute(
            "SELECT local_id, connector_id, id_tag, csms_id, meter_start_wh, start_ts,"
            " last_meter_wh, reservation_id FROM transactions WHERE active = 1"
        ).fetchall()
        return [TxRecord(*row) for row in rows]

    # ------------------------------------------------------------------ outbound queue
    def enqueue(self, action: str, payload: dict[str, Any], tx_local_id: int | None) -> int:
        with self._tx() as db:
            return self._enqueue(db, action, payload, tx_local_id, payload.get("timestamp", ""))

    def _enqueue(
        self,
        db: sqlite3.Connection,
        action: str,
        payload: dict[str, Any],
        tx_local_id: int | None,
        created: str,
    ) -> int:
        if db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] >= self.max_queue:
            self._thin(db)
        cur = db.execute(
            "INSERT INTO queue (action, payload, tx_local_id, created) VALUES (?, ?, ?, ?)",
            (action, json.dumps(payload, separators=(",", ":")), tx_local_id, created),
        )
        return int(cur.lastrowid or 0)

    def _thin(self, db: sqlite3.Connection) -> None:
        """Drop one intermediate MeterValues to make room (never the first or last of a
        transaction, never a StartTransaction or StopTransaction); count and log it."""
        row = db.execute(
            "SELECT q.seq, q.tx_local_id FROM queue q WHERE q.action = 'MeterValues'"
            " AND q.failed = 0"
            " AND EXISTS (SELECT 1 FROM queue e WHERE e.action = 'MeterValues'"
            "   AND e.tx_local_id IS q.tx_local_id AND e.seq < q.seq)"
            " AND EXISTS (SELECT 1 FROM queue l WHERE l.action = 'MeterValues'"
            "   AND l.tx_local_id IS q.tx_local_id AND l.seq > q.seq)"
            " ORDER BY q.seq LIMIT 1 OFFSET 0"
        ).fetchone()
        if row is None:
            log.error("outbound queue is full (%d) and holds nothing that may be dropped",
                      self.max_queue)  # fmt: skip
            return
        db.execute("DELETE FROM queue WHERE seq = ?", (row[0],))
        dropped = int(self._get(db, "queue.dropped") or 0) + 1
        db.execute(
            "INSERT OR REPLACE INTO kv (key, value) VALUES ('queue.dropped', ?)", (str(dropped),)
        )
        log.warning(
            "outbound queue full (%d): dropped an intermediate MeterValues of transaction %s"
            " (%d dropped so far)",
            self.max_queue,
            row[1],
            dropped,
        )

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def queue_dropped(self) -> int:
        return int(self.get("queue.dropped") or 0)

    def queue_head(self) -> QueuedMessage | None:
        row = self._db.execute(
            "SELECT seq, action, payload, tx_local_id, attempts FROM queue"
            " WHERE failed = 0 ORDER BY seq LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return QueuedMessage(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def queue_done(self, seq: int) -> None:
        self._db.execute("DELETE FROM queue WHERE seq = ?", (seq,))

    def start_delivered(self, seq: int, local_id: int, csms_id: int) -> None:
        """StartTransaction answered: record the CSMS id and dequeue it in one commit."""
        with self._tx() as db:
            db.execute(
                "UPDATE transactions SET csms_id = ? WHERE local_id = ?", (csms_id, local_id)
            )
            db.execute("DELETE FROM queue WHERE seq = ?", (seq,))

    def queue_attempt(self, seq: int, error: str, *, give_up: bool) -> None:
        self._db.execute(
            "UPDATE queue SET attempts = attempts + 1, last_error = ?, failed = ? WHERE seq = ?",
            (error, 1 if give_up else 0, seq),
        )

    def queue_counts(self) -> tuple[int, int]:
        """Return ``(pending, failed)``."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(failed = 0), 0), COALESCE(SUM(failed = 1), 0) FROM queue"
        ).fetchone()
        return int(row[0]), int(row[1])

    # ------------------------------------------------------------------ auth cache
    def cache_put(
        self, id_tag: str, status: str, expiry: str | None, parent_id_tag: str | None
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO auth_cache VALUES (?, ?, ?, ?)",
            (id_tag, status, expiry, parent_id_tag),
        )

    def cache_get(self, id_tag: str) -> tuple[str, str | None, str | None] | None:
        row = self._db.execute(
            "SELECT status, expiry, parent_id_tag FROM auth_cache WHERE id_tag = ?", (id_tag,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def cache_clear(self) -> None:
        self._db.execute("DELETE FROM auth_cache")

    # ------------------------------------------------------------------ charging profiles
    def profiles(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT body FROM profiles ORDER BY profile_id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def put_profile(self, profile_id: int, connector_id: int, body: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?)",
            (profile_id, connector_id, json.dumps(body)),
        )

    def delete_profile(self, profile_id: int) -> None:
        self._db.execute("DELETE FROM profiles WHERE profile_id = ?", (profile_id,))
