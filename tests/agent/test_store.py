"""The SQLite store: durable queue order, transactions, corrupt files moved aside."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from agent.store import MIGRATIONS, PAGE_SIZE, Store

REPO = Path(__file__).resolve().parents[2]


def test_transaction_and_queue_survive_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=10,
                                    start_ts="2026-01-01T00:00:00Z", reservation_id=None,
                                    start_payload={"idTag": "T"})  # fmt: skip
    store.enqueue("MeterValues", {"connectorId": 1}, local)
    store.close()
    store = Store.open(tmp_path)
    assert [t.local_id for t in store.active_transactions()] == [local]
    head = store.queue_head()
    assert head is not None and head.action == "StartTransaction"
    store.start_delivered(head.seq, local, 4711)
    assert store.csms_transaction_id(local) == 4711
    head = store.queue_head()
    assert head is not None and head.action == "MeterValues" and head.tx_local_id == local
    store.queue_attempt(head.seq, "CALLERROR", give_up=True)
    assert store.queue_head() is None
    assert store.queue_counts() == (0, 1)  # kept visible, not dropped


def test_end_transaction_queues_stop_in_the_same_commit(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    store.end_transaction(local, meter_stop_wh=5, stop_ts="t1", reason="Local",
                          stop_payload={"meterStop": 5})  # fmt: skip
    assert store.active_transactions() == []
    actions = []
    while (head := store.queue_head()) is not None:
        actions.append(head.action)
        store.queue_done(head.seq)
    assert actions == ["StartTransaction", "StopTransaction"]


def test_corrupt_database_is_moved_aside_not_truncated(tmp_path: Path) -> None:
    (tmp_path / "evcp.db").write_bytes(b"this is not a database" * 100)
    store = Store.open(tmp_path)
    aside = list(tmp_path.glob("evcp.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == b"this is not a database" * 100
    store.put("k", "v")
    assert store.get("k") == "v"


def test_schema_version_is_recorded(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "evcp.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_full_queue_thins_intermediate_meter_values_only(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.max_queue = 6
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    for n in range(10):
        store.enqueue("MeterValues", {"n": n}, local)
    store.end_transaction(local, meter_stop_wh=5, stop_ts="t1", reason="Local",
                          stop_payload={"meterStop": 5})  # fmt: skip
    delivered = []
    while (head := store.queue_head()) is not None:
        delivered.append((head.action, head.payload.get("n")))
        store.queue_done(head.seq)
    assert delivered[0] == ("StartTransaction", None)
    assert delivered[-1] == ("StopTransaction", None)
    meter_values = [n for action, n in delivered if action == "MeterValues"]
    assert meter_values[0] == 0  # the first of the transaction is kept
    assert meter_values[-1] == 9  # and the last
    assert meter_values == sorted(meter_values)  # order is kept
    assert len(delivered) <= 7
    assert store.queue_dropped() == 10 + 2 - len(delivered)


def test_corrupt_file_and_its_wal_are_moved_aside_exactly_as_found(tmp_path: Path) -> None:
    """A page of the main file is damaged while the WAL holds newer pages. Closing the
    database would checkpoint the WAL into the damaged file (changing, possibly truncating
    it): what is moved aside must be both files as they were found."""
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    for n in range(300):
        store.enqueue("MeterValues", {"n": n, "pad": os.urandom(100).hex()}, local)
    assert store._disk is not None
    store._disk.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for n in range(20):
        store.enqueue("MeterValues", {"n": n}, local)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("evcp.db", "evcp.db-wal"):
        shutil.copy(tmp_path / name, saved / name)
    store.close()
    data = (saved / "evcp.db").read_bytes()
    for victim in range(len(data) // PAGE_SIZE - 1, 1, -1):  # a b-tree page quick_check reads
        trial = bytearray(data)
        start = victim * PAGE_SIZE + 8
        trial[start : (victim + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE - 8)
        for name in ("evcp.db", "evcp.db-wal"):
            (tmp_path / name).unlink(missing_ok=True)
        (tmp_path / "evcp.db").write_bytes(trial)
        shutil.copy(saved / "evcp.db-wal", tmp_path / "evcp.db-wal")
        found = {n: (tmp_path / n).read_bytes() for n in ("evcp.db", "evcp.db-wal")}
        Store.open(tmp_path).close()
        aside = sorted(tmp_path.glob("evcp.db.corrupt-*"))
        if aside:
            break
    else:
        raise AssertionError("no damaged page made the integrity check fail")
    assert {p.name.rsplit("-", 1)[-1] if p.name.endswith("-wal") else "db" for p in aside} == {
        "db",
        "wal",
    }
    main = next(p for p in aside if not p.name.endswith("-wal"))
    wal = next(p for p in aside if p.name.endswith("-wal"))
    assert main.read_bytes() == found["evcp.db"]
    assert wal.read_bytes() == found["evcp.db-wal"]


def test_an_unreadable_queued_message_is_kept_as_failed_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    """Bit rot inside a stored payload (the integrity check does not read values)."""
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    store.enqueue("MeterValues", {"n": 1}, local)
    store.enqueue("MeterValues", {"n": 2}, local)
    store._db.execute(
        "UPDATE queue SET payload = ? WHERE seq = (SELECT MAX(seq) - 1 FROM queue)",
        (b"x\x9c\x00garbage",),
    )
    head = store.queue_head()
    assert head is not None and head.action == "StartTransaction"
    store.queue_done(head.seq)
    head = store.queue_head()
    assert head is not None and head.payload == {"n": 2}
    failed = store.queue_failed()
    assert [(action, error) for _seq, action, _tx, _at, error in failed] == [
        ("MeterValues", "unreadable: zlib.error")
    ]


def test_a_state_file_that_cannot_be_written_at_all_runs_in_memory_until_it_can(
    tmp_path: Path,
) -> None:
    """No state file yet and the kernel refuses every write to a file (RLIMIT_FSIZE 0, as
    a full disk would): the agent's store starts in memory instead of failing, and writes
    everything to the file once writes succeed again."""
    state = tmp_path / "state"
    script = textwrap.dedent(
        f"""
        import json, resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        from agent.store import Store
        Store.disk_retry_s = 0.0
        store = Store.open(Path({str(state)!r}))
        before = store.storage_status()
        store.put("during", "1")
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        store.put("after", "2")
        print(json.dumps([before, store.storage_status()]))
        store.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert before["on_disk"] is False and before["error"]
    assert after["on_disk"] is True and after["error"] is None
    store = Store.open(state)
    assert (store.get("during"), store.get("after")) == ("1", "2")


def test_an_old_state_file_that_cannot_be_upgraded_now_is_never_replaced(tmp_path: Path) -> None:
    """A version 1 state file, and the kernel refuses writes (a full disk) just as the
    upgraded agent opens it: the upgrade cannot run. The store must refuse to open rather
    than start empty in memory and later write that empty state over the file."""
    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / "evcp.db", isolation_level=None)
    old.execute(f"PRAGMA page_size={PAGE_SIZE}")
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version=1; COMMIT;")
    old.execute("INSERT INTO kv (key, value) VALUES ('csms.password', 'kept-0123456789')")
    old.close()
    script = textwrap.dedent(
        f"""
        import resource, signal, sqlite3
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from agent.store import Store
        try:
            Store.open(Path({str(state)!r})).close()
        except sqlite3.Error as exc:
            print("refused:", exc)
        else:
            print("opened")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused"), done.stdout
    store = Store.open(state)  # writes allowed again: upgraded, nothing lost
    assert store.get("csms.password") == "kept-0123456789"
