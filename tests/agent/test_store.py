"""The SQLite store: durable queue order, transactions, corrupt files moved aside."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.store import Store


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
