"""The small tables: configuration values and the key-value table, the last meter reading
of running transactions waiting to be written (:class:`MeterNotes`), the authorization
cache, the local authorization list, reservations and charging profiles. Each class reads
through and writes with the shared :class:`~agent.store.db.Database`."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.store.db import Database, transaction

T = TypeVar("T")


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


# ---------------------------------------------------------------------- config and kv
def put_kv(db: sqlite3.Connection, key: str, value: str | None) -> None:
    """In the write in progress: set (None: remove) a key of the key-value table."""
    if value is None:
        db.execute("DELETE FROM kv WHERE key = ?", (key,))
    else:
        db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


def get_kv(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


class Settings:
    """OCPP configuration values (``config``) and the agent's own keys (``kv``)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def config_values(self) -> dict[str, str]:
        return dict(self._database.db.execute("SELECT key, value FROM config").fetchall())

    def set_config(self, key: str, value: str) -> None:
        self._database.write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, value)
            )
        )

    def get(self, key: str, default: str | None = None) -> str | None:
        value = get_kv(self._database.db, key)
        return default if value is None else value

    def put(self, key: str, value: str | None) -> None:
        def put(db: sqlite3.Connection) -> None:
            put_kv(db, key, value)

        self._database.write(put)


# ---------------------------------------------------------------------- meter readings
def note_row(db: sqlite3.Connection, local_id: int, energy_wh: int, ts: str) -> None:
    """In the write in progress: a running transaction's last meter reading."""
    db.execute(
        "UPDATE transactions SET last_meter_wh = MAX(COALESCE(last_meter_wh, 0), ?),"
        " last_meter_ts = ? WHERE local_id = ? AND active = 1",
        (energy_wh, ts, local_id),
    )


class MeterNotes:
    """The last meter reading per running transaction not yet written, ``(Wh,
    timestamp)``, and when each transaction's reading was last written (monotonic)."""

    def __init__(self) -> None:
        self.notes: dict[int, tuple[int, str]] = {}
        self.noted_at: dict[int, float] = {}

    def get(self, local_id: int) -> tuple[int, str] | None:
        return self.notes.get(local_id)

    def write(self, db: sqlite3.Connection, local_id: int) -> None:
        """In the write in progress: the transaction's reading, if one waits."""
        note = self.notes.get(local_id)
        self.noted_at[local_id] = time.monotonic()
        if note is not None:
            note_row(db, local_id, *note)

    def noted(self, local_id: int, energy_wh: int, ts: str) -> None:
        """The note is committed: forget it, unless a newer one came meanwhile. (Forgotten
        only after the commit: a commit that fails and is redone in memory keeps it.)"""
        if self.notes.get(local_id) == (energy_wh, ts):
            del self.notes[local_id]

    def forget(self, local_id: int) -> None:
        self.notes.pop(local_id, None)
        self.noted_at.pop(local_id, None)


# ---------------------------------------------------------------------- auth cache
class CacheSize(Protocol):
    #: Most entries in the authorization cache (invalid and oldest entries go first).
    cache_max: int


class AuthCache:
    def __init__(self, database: Database, limits: CacheSize) -> None:
        self._database = database
        self._limits = limits

    def put(self, id_tag: str, status: str, expiry: str | None, parent_id_tag: str | None) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM auth_cache WHERE id_tag = ? COLLATE NOCASE", (id_tag,))
            db.execute(
                "INSERT INTO auth_cache (id_tag, status, expiry, parent_id_tag, updated)"
                " VALUES (?, ?, ?, ?, ?)",
                (id_tag, status, expiry, parent_id_tag, time.time()),
            )
            count = db.execute("SELECT COUNT(*) FROM auth_cache").fetchone()[0]
            excess = count - self._limits.cache_max
            if excess > 0:
                # Entries that do not authorize go first, then the least recently updated.
                db.execute(
                    "DELETE FROM auth_cache WHERE id_tag IN (SELECT id_tag FROM auth_cache"
                    " ORDER BY status = 'Accepted', updated LIMIT ?)",
                    (excess,),
                )

        self._database.write(put, durable=False)

    def get(self, id_tag: str) -> tuple[str, str | None, str | None] | None:
        row = self._database.db.execute(
            "SELECT status, expiry, parent_id_tag FROM auth_cache WHERE id_tag = ? COLLATE NOCASE",
            (id_tag,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def clear(self) -> None:
        self._database.write(lambda db: db.execute("DELETE FROM auth_cache"))


# ---------------------------------------------------------------------- local auth list
class _TooLarge(Exception):
    """Rolls back a local list update that would exceed the maximum size."""


class LocalList:
    def __init__(self, database: Database) -> None:
        self._database = database

    def version(self) -> int:
        return int(get_kv(self._database.db, "local_list.version") or 0)

    def size(self) -> int:
        return int(self._database.db.execute("SELECT COUNT(*) FROM local_list").fetchone()[0])

    def get(self, id_tag: str) -> AuthEntry | None:
        row = self._database.db.execute(
            "SELECT status, expiry, parent_id_tag FROM local_list WHERE id_tag = ?", (id_tag,)
        ).fetchone()
        return None if row is None else AuthEntry(row[0], row[1], row[2])

    def entries(self) -> dict[str, AuthEntry]:
        rows = self._database.db.execute(
            "SELECT id_tag, status, expiry, parent_id_tag FROM local_list ORDER BY id_tag"
        ).fetchall()
        return {r[0]: AuthEntry(r[1], r[2], r[3]) for r in rows}

    def update(
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
            # (Two statements for the whole list: an idTag appears once in it, so the
            # order of removals and insertions does not matter.)
            db.executemany(
                "DELETE FROM local_list WHERE id_tag = ?",
                ((id_tag,) for id_tag, entry in entries if entry is None),
            )
            db.executemany(
                "INSERT OR REPLACE INTO local_list VALUES (?, ?, ?, ?)",
                (
                    (id_tag, entry.status, entry.expiry, entry.parent_id_tag)
                    for id_tag, entry in entries
                    if entry is not None
                ),
            )
            if db.execute("SELECT COUNT(*) FROM local_list").fetchone()[0] > max_size:
                raise _TooLarge
            put_kv(db, "local_list.version", str(version))
            return True

        try:
            return self._database.write(update)
        except _TooLarge:
            return False

    def stage(self, *, full: bool) -> StagedLocalList:
        """Start a SendLocalList written in steps (:class:`StagedLocalList`)."""
        return StagedLocalList(self._database, full=full)


class StagingFailed(Exception):
    """A SendLocalList applied in steps cannot go on: its staged entries could not be
    written (the temporary table's file), or are gone (the state moved between the disk and
    memory meanwhile). The list is as it was."""


#: Most memory SQLite's page cache of the temporary table may hold (a 10,000-entry list
#: is about 0.5 MiB of pages; beyond this they go to a temporary file, and they are given
#: back after each update).
STAGING_CACHE_KIB = 256


class StagedLocalList:
    """A SendLocalList applied in steps, for a list too long to write in one go without
    stalling the agent.

    :meth:`add` writes entries (``None``: remove the idTag) to a temporary table of the
    connection (``temp.local_list_next``: in memory or a temporary file, never the state
    file), each call its own short transaction; :meth:`apply` then replaces (Full) or
    updates (Differential) the list and sets its version in one commit. Until that commit
    the list and its version are exactly as they were: a lookup in between (a swipe, a
    GetLocalListVersion) sees the old list, and :meth:`close` without :meth:`apply` (a
    refused entry, a dropped connection, :class:`StagingFailed`) leaves it so. Between the
    steps the connection is outside any transaction: every other write (a queued
    transaction message) commits as it always does. :meth:`close` removes the temporary
    table; call it in all cases.
    """

    def __init__(self, database: Database, *, full: bool) -> None:
        self._database = database
        self._db = database.db
        self.full = full
        #: Of a Differential update: whether the list's other entries are being copied to
        #: the staged ones (:meth:`carry`), and up to which rowid of ``local_list``.
        self._carrying = False
        self._carried_to = 0
        #: The staged entries are the whole new list (a Full update, or all carried).
        self._whole = full
        try:
            self._db.execute("DROP TABLE IF EXISTS temp.local_list_next")
            self._db.execute(f"PRAGMA temp.cache_size=-{STAGING_CACHE_KIB}")
            self._db.execute(
                "CREATE TEMP TABLE local_list_next"
                " (id_tag TEXT NOT NULL, status TEXT, expiry TEXT, parent_id_tag TEXT)"
            )
        except sqlite3.Error as exc:
            raise StagingFailed(f"the entries cannot be staged: {exc}") from None

    def _same(self, db: sqlite3.Connection) -> None:
        if db is not self._db:
            raise StagingFailed("the state moved between the disk and memory")

    def _staging(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a transaction of its own that writes the temporary table only:
        not through :meth:`Database.write`, which would take a temporary file that cannot
        be written for the state file's trouble and move the state to memory."""
        db = self._database.db
        self._same(db)
        try:
            return transaction(db, fn)
        except sqlite3.Error as exc:
            raise StagingFailed(f"the entries cannot be staged: {exc}") from None

    def add(self, entries: list[tuple[str, AuthEntry | None]]) -> None:
        """Stage entries (an idTag appears once in the whole update: the caller checks)."""
        self._staging(
            lambda db: db.executemany(
                "INSERT INTO temp.local_list_next VALUES (?, ?, ?, ?)",
                (
                    (id_tag, None, None, None)
                    if entry is None
                    else (id_tag, entry.status, entry.expiry, entry.parent_id_tag)
                    for id_tag, entry in entries
                ),
            )
        )

    def carry(self, rows: int) -> bool:
        """Of a Differential update: copy up to ``rows`` more of the list's entries that
        the update leaves as they are to the staged ones (one short transaction); False
        once all are. :meth:`apply` then writes the whole list afresh instead of changing
        it in place, which takes about half as long for a long update (the same pages are
        rewritten either way). The list must not change meanwhile (one update at a
        time)."""
        if self._whole:
            return False

        def carry(db: sqlite3.Connection) -> bool:
            if not self._carrying:
                # (The staged idTags are unique, as the list's: the case-folded check.)
                db.execute(
                    "CREATE UNIQUE INDEX temp.local_list_next_tag"
                    " ON local_list_next (id_tag COLLATE NOCASE)"
                )
                self._carrying = True
            last = db.execute(
                "SELECT rowid FROM local_list WHERE rowid > ? ORDER BY rowid LIMIT 1 OFFSET ?",
                (self._carried_to, max(rows, 1) - 1),
            ).fetchone()
            upto = int(last[0]) if last is not None else None
            db.execute(
                "INSERT OR IGNORE INTO temp.local_list_next"
                " SELECT id_tag, status, expiry, parent_id_tag FROM local_list"
                " WHERE rowid > ? AND rowid <= ?",
                (self._carried_to, upto if upto is not None else 2**63 - 1),
            )
            if upto is None:
                return False
            self._carried_to = upto
            return True

        more = self._staging(carry)
        self._whole = not more
        return more

    def apply(self, *, version: int, max_size: int) -> int | None:
        """Apply the staged entries and set the list's version in one commit; returns the
        list's new size, or None, changing nothing, when it would exceed ``max_size``.
        Raises :class:`StagingFailed` (changing nothing) when the staged entries are
        gone."""

        def apply(db: sqlite3.Connection) -> int:
            self._same(db)
            if self._whole:
                db.execute("DELETE FROM local_list")
            else:
                db.execute(
                    "DELETE FROM local_list"
                    " WHERE id_tag IN (SELECT id_tag FROM temp.local_list_next)"
                )
            db.execute(
                "INSERT OR REPLACE INTO local_list SELECT id_tag, status, expiry, parent_id_tag"
                " FROM temp.local_list_next WHERE status IS NOT NULL"
            )
            size = int(db.execute("SELECT COUNT(*) FROM local_list").fetchone()[0])
            if size > max_size:
                raise _TooLarge
            put_kv(db, "local_list.version", str(version))
            return size

        try:
            return self._database.write(apply)
        except _TooLarge:
            return None

    def close(self) -> None:
        """Remove the temporary table and give back the memory its pages took (no error:
        the update's outcome stands)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("DROP TABLE IF EXISTS temp.local_list_next")
            self._db.execute("PRAGMA shrink_memory")


# ---------------------------------------------------------------------- reservations
class Reservations:
    def __init__(self, database: Database) -> None:
        self._database = database

    def all(self) -> list[ReservationRecord]:
        rows = self._database.db.execute(
            "SELECT reservation_id, connector_id, id_tag, parent_id_tag, expiry"
            " FROM reservations ORDER BY reservation_id"
        ).fetchall()
        return [ReservationRecord(*row) for row in rows]

    def put(self, r: ReservationRecord) -> None:
        self._database.write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?)",
                (r.reservation_id, r.connector_id, r.id_tag, r.parent_id_tag, r.expiry),
            )
        )

    def delete(self, reservation_id: int) -> None:
        self._database.write(
            lambda db: db.execute(
                "DELETE FROM reservations WHERE reservation_id = ?", (reservation_id,)
            )
        )


# ---------------------------------------------------------------------- charging profiles
class Profiles:
    def __init__(self, database: Database) -> None:
        self._database = database

    def all(self) -> list[dict[str, Any]]:
        rows = self._database.db.execute("SELECT body FROM profiles ORDER BY profile_id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def put(self, profile_id: int, connector_id: int, body: dict[str, Any]) -> None:
        self._database.write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?)",
                (profile_id, connector_id, json.dumps(body)),
            )
        )

    def delete(self, profile_id: int) -> None:
        self._database.write(
            lambda db: db.execute("DELETE FROM profiles WHERE profile_id = ?", (profile_id,))
        )
