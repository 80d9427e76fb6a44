"""MeterValues staged in RAM (``[agent] queue_flush_s`` > 0): the disk is spared the samples
the CSMS acknowledges; what is unacknowledged survives a crash of the agent, reaches the
disk every ``queue_flush_s`` seconds, and keeps its place in the order.

A crash is a child process that ends with ``os._exit`` (no close, no flush: what a SIGKILL
leaves); a power cut is that, and the stage file deleted (its tmpfs is gone).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.store import Store
from tests.conftest import after_power_cut, drain

REPO = Path(__file__).resolve().parents[2]


def mv(n: int) -> dict[str, Any]:
    return {"connectorId": 1, "transactionId": 0, "n": n,
            "meterValue": [{"timestamp": f"2026-01-01T00:00:{n:02d}.000Z",
                            "sampledValue": [{"value": str(n)}]}]}  # fmt: skip


def begin(store: Store) -> int:
    return store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                   start_ts="t0", reservation_id=None,
                                   start_payload={"n": "start"})  # fmt: skip


def end(store: Store, local: int) -> None:
    store.end_transaction(local, meter_stop_wh=9, stop_ts="t9", reason="Local",
                          stop_payload={"n": "stop"})  # fmt: skip


def open_staged(tmp_path: Path, flush_s: float = 300.0) -> Store:
    store = Store.open(tmp_path / "state")
    store.stage(tmp_path / "run" / "stage.db", flush_s)
    return store


def die_after_the_next_move() -> None:
    """(In a crash child.) Die right after the commit that moves staged messages to the
    state file, before they are removed from the stage."""
    committed = Store._committed

    def die(self: Store) -> None:
        if self._moving and self._moving[0]:
            os._exit(0)
        committed(self)

    Store._committed = die  # type: ignore[method-assign]


def crash(tmp_path: Path, body: str, flush_s: float = 300.0) -> None:
    """Run ``body`` against a staged store in a child process that then dies without
    closing anything."""
    script = (
        textwrap.dedent(
            f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from agent.store import Store
        from tests.agent.test_store_stage import begin, die_after_the_next_move, end, mv
        store = Store.open(Path({str(tmp_path / "state")!r}))
        store.stage(Path({str(tmp_path / "run" / "stage.db")!r}), {flush_s!r})
        """
        )
        + textwrap.dedent(body)
        + "\nos._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr


def crash_with_samples(tmp_path: Path, count: int) -> None:
    """A crash with one transaction open and its samples 1..``count`` staged."""
    crash(tmp_path, f"""
        local = begin(store)
        for n in range(1, {count + 1}):
            store.enqueue("MeterValues", mv(n), local)
    """)  # fmt: skip


def power_cut(tmp_path: Path) -> None:
    """The stage's tmpfs is gone with the power."""
    (tmp_path / "run" / "stage.db").unlink()  # (it was there)
    (tmp_path / "run" / "stage.db-wal").unlink(missing_ok=True)


def running_transaction(store: Store) -> int:
    (tx,) = store.active_transactions()
    return tx.local_id


def disk_bytes(tmp_path: Path) -> int:
    return sum(f.stat().st_size for f in (tmp_path / "state").glob("evcp.db*"))


@pytest.mark.parametrize("staged", [True, False])
def test_acknowledged_samples_never_reach_the_disk(tmp_path: Path, staged: bool) -> None:
    store = open_staged(tmp_path) if staged else Store.open(tmp_path / "state")
    local = begin(store)
    assert drain(store) == [("StartTransaction", "start")]
    before = disk_bytes(tmp_path)
    for n in range(50):  # online: each sample is sent and acknowledged before the next
        store.enqueue("MeterValues", mv(n), local)
        assert drain(store) == [("MeterValues", n)]
    grew = disk_bytes(tmp_path) - before
    if staged:
        assert grew == 0
    else:  # without a stage, each sample is written (the test can tell the difference)
        assert grew > 50 * 1024
    store.close()


def test_the_stage_stays_small_in_ram(tmp_path: Path) -> None:
    """A thousand samples (17 hours at 60 s sampling) pass through the stage online; the
    files it keeps in RAM (/run is a tmpfs) stay a few dozen KiB, not SQLite's 1 MiB of
    WAL."""
    store = open_staged(tmp_path)
    local = begin(store)
    drain(store)
    for n in range(1000):
        store.note_meter(local, n, f"t{n}")
        store.enqueue("MeterValues", mv(n % 60), local)
        assert drain(store) == [("MeterValues", n % 60)]
    in_ram = sum(f.stat().st_size for f in (tmp_path / "run").glob("stage.db*"))
    assert in_ram < 96 * 1024, in_ram
    store.close()


def test_order_is_kept_across_the_stage_and_the_disk(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    for n in range(1, 4):
        store.enqueue("MeterValues", mv(n), local)
    assert store.queue_counts() == (4, 0)
    end(store, local)  # the staged samples go to the disk first, then the Stop
    second = begin(store)
    store.enqueue("MeterValues", mv(4), second)
    assert store.storage_status()["stage"] == str(tmp_path / "run" / "stage.db")
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("MeterValues", 3),
                            ("StopTransaction", "stop"), ("StartTransaction", "start"),
                            ("MeterValues", 4)]  # fmt: skip
    assert store.queue_counts() == (0, 0)
    store.close()


def test_a_crash_keeps_staged_samples_and_they_are_sent_once(tmp_path: Path) -> None:
    crash_with_samples(tmp_path, 3)
    store = open_staged(tmp_path)
    assert store.queue_counts() == (4, 0)
    local = running_transaction(store)
    store.enqueue("MeterValues", mv(4), local)
    end(store, local)
    assert drain(store) == [("StartTransaction", "start"), *(("MeterValues", n) for n in
                            range(1, 5)), ("StopTransaction", "stop")]  # fmt: skip
    store.close()
    store = open_staged(tmp_path)
    assert store.queue_counts() == (0, 0)
    store.close()


def test_a_crash_between_moving_to_disk_and_unstaging_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    crash(tmp_path, """
        local = begin(store)
        store.enqueue("MeterValues", mv(1), local)
        store.enqueue("MeterValues", mv(2), local)
        die_after_the_next_move()
        end(store, local)
    """)  # fmt: skip
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("StopTransaction", "stop")]  # fmt: skip
    store.close()


def test_a_power_cut_loses_only_the_offline_samples_not_yet_flushed(tmp_path: Path) -> None:
    crash(tmp_path, """
        local = begin(store)
        store.enqueue("MeterValues", mv(1), local)
        store.enqueue("MeterValues", mv(2), local)
        store._staged_since -= 300  # five minutes later
        store.enqueue("MeterValues", mv(3), local)  # the oldest waited 300 s: all to disk
        store.enqueue("MeterValues", mv(4), local)  # staged only
    """)  # fmt: skip
    power_cut(tmp_path)
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("MeterValues", 3)]  # fmt: skip
    store.close()


def test_polling_the_meter_flushes_offline_samples_when_due(tmp_path: Path) -> None:
    crash(tmp_path, """
        local = begin(store)
        store.enqueue("MeterValues", mv(1), local)
        store._staged_since -= 300  # five minutes later
        store.note_meter(local, 5, "t1")  # a meter poll, no new sample
    """)  # fmt: skip
    power_cut(tmp_path)
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1)]
    store.close()


def test_a_message_given_up_on_is_kept_on_disk(tmp_path: Path) -> None:
    crash(tmp_path, """
        local = begin(store)
        head = store.queue_head()
        store.start_delivered(head.seq, local, 77)
        store.enqueue("MeterValues", mv(1), local)
        head = store.queue_head()
        store.queue_attempt(head.seq, "CALLERROR FormationViolation", give_up=True)
    """)  # fmt: skip
    power_cut(tmp_path)
    store = open_staged(tmp_path)
    assert [(action, error) for _, action, _, _, error in store.queue_failed()] == [
        ("MeterValues", "CALLERROR FormationViolation")
    ]
    assert store.queue_retry_failed() == 1
    assert drain(store) == [("MeterValues", 1)]
    store.close()


def test_a_stage_left_by_another_state_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crash_with_samples(tmp_path, 1)
    other = Store.open(tmp_path / "other-state")
    with caplog.at_level(logging.ERROR, "evcp.store"):
        other.stage(tmp_path / "run" / "stage.db", 300)
    assert "was left by another state file" in caplog.text
    aside = list((tmp_path / "run").glob("stage.db.aside-*"))
    assert [p.name for p in aside if not p.name.endswith("-wal")], aside
    assert other.queue_counts() == (0, 0)
    other.close()
    store = open_staged(tmp_path)  # the one it belongs to can still be found aside; its
    assert store.queue_counts() == (1, 0)  # StartTransaction was on disk all along
    store.close()


def test_a_corrupt_stage_is_moved_aside_and_a_new_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stage.db").write_bytes(b"not a database" * 200)
    store = Store.open(tmp_path / "state")
    with caplog.at_level(logging.ERROR, "evcp.store"):
        store.stage(tmp_path / "run" / "stage.db", 300)
    assert "unreadable" in caplog.text
    (aside,) = (tmp_path / "run").glob("stage.db.aside-*")
    assert aside.read_bytes() == b"not a database" * 200
    assert store.storage_status()["stage"] is not None
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1)]
    store.close()


def test_a_stage_dir_that_cannot_be_used_means_every_message_goes_to_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "run").write_text("a file, not a directory")
    store = Store.open(tmp_path / "state")
    with caplog.at_level(logging.ERROR, "evcp.store"):
        store.stage(tmp_path / "run" / "stage.db", 300)
    assert "cannot stage MeterValues" in caplog.text
    assert store.storage_status()["stage"] is None
    crash_free = begin(store)
    store.enqueue("MeterValues", mv(1), crash_free)
    store._db.close()  # no flush at close could have helped: it was on disk already
    store = Store.open(tmp_path / "state")
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1)]
    store.close()


def test_a_stage_that_fails_while_running_hands_over_to_the_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    assert store._stage is not None
    store._stage.close()  # what a tmpfs that fails underneath looks like to the store
    with caplog.at_level(logging.ERROR, "evcp.store"):
        store.enqueue("MeterValues", mv(1), local)
    assert "the MeterValues stage" in caplog.text and "failed" in caplog.text
    assert store.storage_status()["stage"] is None
    store.enqueue("MeterValues", mv(2), local)
    store._db.close()  # a crash: both samples were written to the disk
    store = Store.open(tmp_path / "state")
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2)]  # fmt: skip
    store.close()


def test_turning_staging_off_still_delivers_what_was_staged(tmp_path: Path) -> None:
    crash_with_samples(tmp_path, 1)
    store = Store.open(tmp_path / "state")
    store.stage(tmp_path / "run" / "stage.db", 0)  # queue_flush_s = 0 now
    assert store.storage_status()["stage"] is None
    assert not (tmp_path / "run" / "stage.db").exists()
    local = running_transaction(store)
    store.enqueue("MeterValues", mv(2), local)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2)]  # fmt: skip
    store.close()


def test_a_stage_that_cannot_be_written_hands_over_and_is_never_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    assert store._stage is not None
    store._stage.execute("PRAGMA query_only=1")  # its tmpfs is full: reads work, writes fail
    store.enqueue("MeterValues", mv(3), local)
    end(store, local)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("MeterValues", 3),
                            ("StopTransaction", "stop")]  # fmt: skip
    store.close()
    assert list((tmp_path / "run").glob("stage.db.failed-*"))  # kept, for a look
    store = open_staged(tmp_path)
    assert drain(store) == []
    store.close()


def test_a_stage_failing_right_after_a_move_sends_nothing_twice(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    assert store._stage is not None
    store._stage.execute("PRAGMA query_only=1")
    end(store, local)  # committed to disk with the samples; removing them from the stage fails
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("StopTransaction", "stop")]  # fmt: skip
    begin(store)
    assert drain(store) == [("StartTransaction", "start")]
    assert store.queue_counts() == (0, 0)
    store.close()


class FlakyLookups:
    """A stage connection whose look-up of one message fails (an I/O error on one page)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("SELECT 1 FROM queue WHERE seq"):
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


def test_an_acknowledged_sample_is_not_sent_again_when_the_stage_fails_then(
    tmp_path: Path,
) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    assert drain(store) == [("StartTransaction", "start")]
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    head = store.queue_head()
    assert head is not None and head.payload["n"] == 1
    store._stage = FlakyLookups(store._stage)  # type: ignore[assignment]
    store.queue_done(head.seq)  # acknowledged; the stage fails on the way
    end(store, local)
    assert drain(store) == [("MeterValues", 2), ("StopTransaction", "stop")]
    assert store.queue_counts() == (0, 0)
    store.close()


def test_a_full_queue_and_a_failing_stage_still_queue_the_sample(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    store.max_queue = 5
    local = begin(store)
    for n in range(1, 6):
        store.enqueue("MeterValues", mv(n), local)
    assert store._stage is not None
    store._stage.close()
    store.enqueue("MeterValues", mv(6), local)  # raises nothing: thinned, then on disk
    delivered = drain(store)
    assert delivered[0] == ("StartTransaction", "start")
    assert delivered[-1] == ("MeterValues", 6)
    store.close()


def test_a_write_that_fails_moves_nothing_out_of_the_stage(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    with pytest.raises(TypeError):  # a payload that cannot be stored: rolled back
        store.end_transaction(local, meter_stop_wh=9, stop_ts="t9", reason="Local",
                              stop_payload={"timestamp": object()})  # fmt: skip
    store.enqueue("MeterValues", mv(3), local)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("MeterValues", 3)]  # fmt: skip
    store.close()


def test_while_the_disk_is_full_staged_samples_stay_in_ram(tmp_path: Path) -> None:
    """The state lives in memory (a full disk): a flush would move the samples where a
    SIGKILL loses them, so they stay in the stage."""
    crash(tmp_path, """
        local = begin(store)
        pages = store._disk.execute("PRAGMA page_count").fetchone()[0]
        store._disk.execute(f"PRAGMA max_page_count={pages}")  # the disk is full now
        store.put("filler", os.urandom(6000).hex())
        assert store.storage_status()["on_disk"] is False
        store.enqueue("MeterValues", mv(1), local)
        store.enqueue("MeterValues", mv(2), local)
        store._staged_since -= 300  # five minutes later
        store.note_meter(local, 5, "t1")  # a flush is due
        end(store, local)  # the Stop, in memory: lost with the SIGKILL
    """)  # fmt: skip
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2)]  # fmt: skip
    store.close()


def test_a_crash_finds_the_last_reading_in_the_stage(tmp_path: Path) -> None:
    crash(tmp_path, """
        local = begin(store)
        store.note_meter(local, 300, "t3")  # a meter poll
        store.enqueue("MeterValues", mv(3), local)
        head = store.queue_head()
        store.start_delivered(head.seq, local, 77)
        head = store.queue_head()
        store.queue_done(head.seq)  # online: the sample never reached the disk
    """)  # fmt: skip
    store = open_staged(tmp_path)
    assert store.active_transactions()[0].last_meter_wh == 300
    store.close()


def test_a_crash_after_a_move_then_a_disk_that_refuses_writes_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    """The rows are in both files (a SIGKILL between the move's commit and the stage's
    DELETE) and the restarted agent cannot write the disk, so the move at start cannot run:
    the copies in the stage are dropped instead."""
    crash(tmp_path, """
        local = begin(store)
        store.enqueue("MeterValues", mv(1), local)
        store.enqueue("MeterValues", mv(2), local)
        die_after_the_next_move()
        store.flush_stage()
    """)  # fmt: skip
    store = Store.open(tmp_path / "state")
    assert store._disk is not None
    store._disk.execute("PRAGMA query_only=1")  # the file system came back read-only
    store.stage(tmp_path / "run" / "stage.db", 300)
    assert store.queue_counts() == (3, 0)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2)]  # fmt: skip


def test_samples_a_crash_left_staged_reach_the_disk_when_it_takes_writes_again(
    tmp_path: Path,
) -> None:
    """The restarted agent cannot write the disk, so what the crash left in the stage stays
    there; once the disk takes writes again, the next meter poll moves it (no new sample
    has to come first): a power cut after that loses none of it."""
    crash_with_samples(tmp_path, 2)
    store = Store.open(tmp_path / "state")
    assert store._disk is not None
    store._disk.execute("PRAGMA query_only=1")  # the disk refuses writes at start
    store.stage(tmp_path / "run" / "stage.db", 300)
    assert store.storage_status()["on_disk"] is False
    store._disk.execute("PRAGMA query_only=0")  # ... and takes them again
    store._disk_retry_at = 0.0  # (it is time to try)
    store.flush_if_due()  # a meter poll
    assert store.storage_status()["on_disk"] is True
    assert after_power_cut(tmp_path / "state", tmp_path / "cut") == [
        ("StartTransaction", "start"), ("MeterValues", 1), ("MeterValues", 2)]  # fmt: skip
    store.close()


def test_a_full_queue_while_the_disk_is_full_stays_bounded(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    store.max_queue = 10
    local = begin(store)
    assert store._disk is not None
    store._disk.execute("PRAGMA query_only=1")
    store.put("x", "y")  # the disk refuses writes: the state lives in memory
    assert store.storage_status()["on_disk"] is False
    for n in range(200):
        store.enqueue("MeterValues", mv(n % 60), local)
    # The stage holds what it had when the queue filled up; the rest is thinned in memory.
    assert sum(store.queue_counts()) <= store.max_queue + 3


def test_the_queue_is_counted_again_after_a_stage_is_lost(tmp_path: Path) -> None:
    store = open_staged(tmp_path)
    store.max_queue = 5
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    assert store._stage is not None
    store._stage.close()  # unreadable too: samples 1 and 2 are lost (logged)
    for n in range(3, 7):
        store.enqueue("MeterValues", mv(n), local)
    # Five queued (Start, 3 to 6): full, not over -- nothing thinned as if 1 and 2 were.
    assert store.queue_dropped() == 0
    assert drain(store) == [("StartTransaction", "start"), *(("MeterValues", n) for n in
                            range(3, 7))]  # fmt: skip
    store.close()


def test_an_orderly_stop_writes_staged_samples_to_disk(tmp_path: Path) -> None:
    """A clean stop, then a reboot (which empties the tmpfs): nothing staged is lost."""
    store = open_staged(tmp_path)
    local = begin(store)
    store.enqueue("MeterValues", mv(1), local)
    store.close()
    power_cut(tmp_path)
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1)]
    store.close()


def test_a_stop_takes_the_staged_samples_to_disk_with_it(tmp_path: Path) -> None:
    """A StopTransaction, then a power cut: the samples before it are on disk too."""
    crash(tmp_path, """
        local = begin(store)
        store.enqueue("MeterValues", mv(1), local)
        store.enqueue("MeterValues", mv(2), local)
        end(store, local)
    """)  # fmt: skip
    power_cut(tmp_path)
    store = open_staged(tmp_path)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("StopTransaction", "stop")]  # fmt: skip
    store.close()


def test_the_order_holds_while_the_disk_is_full(tmp_path: Path) -> None:
    """The samples stay in the stage and the Stop goes to memory: still sent after them."""
    store = open_staged(tmp_path)
    local = begin(store)
    assert store._disk is not None
    store._disk.execute("PRAGMA query_only=1")
    store.put("x", "y")  # the disk refuses writes: the state lives in memory
    assert store.storage_status()["on_disk"] is False
    store.enqueue("MeterValues", mv(1), local)
    store.enqueue("MeterValues", mv(2), local)
    end(store, local)
    assert drain(store) == [("StartTransaction", "start"), ("MeterValues", 1),
                            ("MeterValues", 2), ("StopTransaction", "stop")]  # fmt: skip
    store.close()


def test_samples_left_in_the_stage_count_towards_the_queue_size(tmp_path: Path) -> None:
    crash_with_samples(tmp_path, 5)
    store = open_staged(tmp_path)
    store.max_queue = 6
    local = running_transaction(store)
    store.enqueue("MeterValues", mv(6), local)  # seven: one is thinned
    assert sum(store.queue_counts()) <= 6
    assert store.queue_dropped() == 1
    store.close()


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_a_stage_that_is_not_in_ram_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "shm":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm here")
        stage_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        stage_dir = tmp_path / "run"
        stage_dir.mkdir()
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(stage_dir)], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    try:
        store = Store.open(tmp_path / "state")
        with caplog.at_level(logging.WARNING, "evcp.store"):
            store.stage(stage_dir / "stage.db", 300)
        store.close()
    finally:
        if where == "shm":
            shutil.rmtree(stage_dir)
    warned = "not in RAM" in caplog.text
    assert warned == (kind not in ("tmpfs", "ramfs")), (kind, caplog.text)
