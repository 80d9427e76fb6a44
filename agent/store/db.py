"""The state database itself: opening ``state_dir/evcp.db`` (WAL, one writer holding the
file), numbered migrations, a corrupt file moved aside, file modes, the write helper (one
committed transaction per write) and the in-memory fallback while the disk refuses writes.

Files and directories the store creates are never readable by other users, whatever the
umask: files :data:`FILE_MODE` (0640: the ``evcp`` group may read them, for a support
tool), directories :data:`DIR_MODE` (0750), set explicitly. SQLite gives the WAL it creates
later the main file's mode; :func:`restrict` sets it again after the first write anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger("evcp.store")

T = TypeVar("T")

#: Page size of a new database: small pages keep the bytes written per sample low.
PAGE_SIZE = 1024
#: Most memory SQLite's page cache of a file database may hold (its default is 2,000 KiB):
#: without a bound, the start-up integrity check and one large local list (10,000 entries
#: are about 1 MiB of pages) would keep their pages in the agent's memory for good. Pages
#: beyond it are read again from the file (the kernel's cache) when needed.
CACHE_KIB = 256

#: Mode of every file the store creates (the database, its WAL and shared-memory files, the
#: stage): owner read/write, the ``evcp`` group read, nobody else.
FILE_MODE = 0o640
#: Mode of every directory the store creates.
DIR_MODE = 0o750

#: The files SQLite keeps beside a database.
SIDE_SUFFIXES = ("-wal", "-shm")

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


class Corrupt(sqlite3.DatabaseError):
    """The state file is not a database, or fails its integrity check."""


#: SQLite result codes that mean the file cannot be written (not a mistake in a query).
_DISK_TROUBLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN",
                 "SQLITE_CORRUPT", "SQLITE_NOTADB")  # fmt: skip


def disk_trouble(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_DISK_TROUBLE)


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema up to date, one committed step per version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")


def set_up(db: sqlite3.Connection, *, new: bool, synchronous: str) -> None:
    """One writer holding the file (no shared-memory index), WAL, a page cache of at most
    :data:`CACHE_KIB`, and the integrity check (a file that fails it raises
    :class:`Corrupt`). ``page_size`` only takes on a new file."""
    if new:
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA locking_mode=EXCLUSIVE")  # first: before anything opens the WAL
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.execute(f"PRAGMA synchronous={synchronous}")
    result = db.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise Corrupt(f"fails its integrity check: {result}")


def transaction(
    db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], *, begin: str = "BEGIN"
) -> T:
    """Run ``fn`` in one transaction (opened with ``begin``): committed when it returns,
    rolled back when anything is raised (the exception goes on)."""
    db.execute(begin)
    try:
        result = fn(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return result


# ---------------------------------------------------------------------- files and modes
def make_dirs(path: Path) -> None:
    """``mkdir -p path``: each directory created gets :data:`DIR_MODE` whatever the umask
    (one that exists is left as it is)."""
    if path.is_dir():
        return
    if path.parent != path:
        make_dirs(path.parent)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, DIR_MODE)


def create_private(path: Path) -> None:
    """Create ``path`` empty with :data:`FILE_MODE` unless it exists, so that SQLite opens
    a file of the right mode (and gives its WAL that mode too). When it cannot be created,
    SQLite reports why as it always did."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def restrict(path: Path) -> None:
    """Set :data:`FILE_MODE` on a database and the side files it has now (a file of an
    older version, or one SQLite created, may be readable by others)."""
    for suffix in ("", *SIDE_SUFFIXES):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if side.stat().st_mode & 0o777 != FILE_MODE:
                os.chmod(side, FILE_MODE)


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` (and its WAL) to ``<name>.<why>-<time>``, private (:func:`restrict`);
    return the new path."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    with contextlib.suppress(OSError):
        restrict(aside)
    return aside


def filesystem(path: Path) -> str | None:
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


# ---------------------------------------------------------------------- opening
def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the state file at ``path``, set up and migrated; raises
    :class:`Corrupt` for a file SQLite cannot read (left exactly as it was found)."""
    new = not path.exists() or path.stat().st_size == 0
    if new:
        create_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2.0)
    try:
        _set_up_and_migrate(db, path, new=new)
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
                os.chmod(copy, FILE_MODE)
        except OSError as copy_error:  # no room for a copy: keep what closing leaves
            log.error("cannot keep an exact copy of %s: %s", path, copy_error)
            for copy in copies:
                copy.unlink(missing_ok=True)
            copies = []
        db.close()
        for side, copy in zip(found, copies, strict=False):
            copy.replace(side)
        raise Corrupt(str(exc)) from exc
    return db


def _set_up_and_migrate(db: sqlite3.Connection, path: Path, *, new: bool) -> None:
    set_up(db, new=new, synchronous="FULL")
    migrate(db)
    with contextlib.suppress(OSError):  # (a file we may not chmod is refused elsewhere)
        restrict(path)


def in_memory() -> sqlite3.Connection:
    """An empty state database in memory, migrated."""
    memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    memory.execute(f"PRAGMA page_size={PAGE_SIZE}")
    migrate(memory)
    return memory


def open_state(state_dir: Path) -> tuple[sqlite3.Connection, Path, sqlite3.Error | None]:
    """Open (or create) ``state_dir/evcp.db``; a corrupt file is moved aside. Returns the
    connection, the path and, when no state file could be created (a full disk), why: the
    connection is then an empty database in memory."""
    make_dirs(state_dir)
    path = state_dir / "evcp.db"
    fresh = not path.exists() or path.stat().st_size == 0
    try:
        db = connect(path)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise StoreInUse(
                f"state file {path} is in use by another process (is another evcp agent"
                " running with the same state_dir?)"
            ) from None
        if not fresh or not disk_trouble(exc):
            raise  # an existing state file is never replaced by an empty one
        return in_memory(), path, exc
    except Corrupt as exc:
        aside = path.with_name(f"evcp.db.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        log.error("state file %s is unreadable (%s); moved aside to %s", path, exc, aside)
        for suffix in ("-wal", "-shm", ""):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(aside.with_name(aside.name + suffix))
        with contextlib.suppress(OSError):
            restrict(aside)
        try:
            db = connect(path)
        except sqlite3.OperationalError as again:
            if not disk_trouble(again):
                raise
            return in_memory(), path, again
    return db, path, None


# ---------------------------------------------------------------------- writing
class RetryDelay(Protocol):
    #: Seconds between attempts to write the state back to disk after a write failed.
    disk_retry_s: float

    def on_disk_full(self, error: str) -> None:
        """The state moved to memory: the disk refuses writes."""


def _nothing() -> None:
    return None


class Database:
    """The connection every part of the store reads and writes through: the state file, or
    a copy of it in memory while the disk refuses writes."""

    def __init__(self, db: sqlite3.Connection, path: Path, limits: RetryDelay) -> None:
        #: The state file; None while it could not even be created (a full disk at start).
        self.disk: sqlite3.Connection | None = db
        #: The connection in use: :attr:`disk`, or the copy in memory.
        self.db = db
        self.path = path
        #: Why the state lives in memory only (a write to disk failed); None when on disk.
        self.write_error: str | None = None
        self.retry_at = 0.0
        self._limits = limits
        #: Called as each attempt of a write starts or fails: what that attempt was to
        #: take along (from the stage) is not taken.
        self.discard: Callable[[], None] = _nothing
        #: Called after each write commits.
        self.committed: Callable[[], None] = _nothing

    @property
    def on_disk(self) -> bool:
        return self.db is self.disk

    def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in one committed transaction; on a failed disk, carry on in memory."""
        if self.db is not self.disk and time.monotonic() >= self.retry_at:
            self.back_to_disk()
        self.discard()
        try:
            try:
                result = self.commit(fn, durable=durable)
            except sqlite3.DatabaseError as exc:
                if self.db is not self.disk or not disk_trouble(exc):
                    raise
                self.to_memory(exc)
                self.discard()
                result = self.commit(fn, durable=durable)
        except BaseException:
            self.discard()  # rolled back: nothing was moved
            raise
        self.committed()
        return result

    def commit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool) -> T:
        db = self.db
        relaxed = not durable and db is self.disk
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            return transaction(db, fn, begin="BEGIN IMMEDIATE")
        finally:
            if relaxed:
                db.execute("PRAGMA synchronous=FULL")

    def to_memory(self, exc: sqlite3.Error) -> None:
        if self.disk is not None:
            memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self.disk.backup(memory)
            self.db = memory
        self.write_error = str(exc)
        self.retry_at = time.monotonic() + self._limits.disk_retry_s
        self._limits.on_disk_full(str(exc))
        log.error(
            "cannot write the state file %s (%s): the agent carries on with its state in"
            " memory, charging and reporting as usual, but a power loss now loses what was"
            " not written; retrying to write it every %.0f s",
            self.path,
            exc,
            self._limits.disk_retry_s,
        )

    def back_to_disk(self, *, final: bool = False) -> None:
        try:
            if self.disk is None:
                self.disk = connect(self.path)
            self.db.backup(self.disk)
        except sqlite3.Error as exc:
            self.retry_at = time.monotonic() + self._limits.disk_retry_s
            (log.error if final else log.warning)(
                "the state file %s still cannot be written (%s)%s",
                self.path,
                exc,
                ": state since the failure is lost at exit" if final else "",
            )
            return
        self.db.close()
        self.db = self.disk
        self.write_error = None
        log.warning("the state file %s can be written again: state saved to disk", self.path)

    def retry_if_due(self) -> None:
        """While the state lives in memory: try the disk again when it is time."""
        if self.db is not self.disk and time.monotonic() >= self.retry_at:
            self.back_to_disk()

    def close(self) -> None:
        if self.db is not self.disk:
            self.db.close()
        if self.disk is not None:
            self.disk.close()
