"""A SendLocalList applied in steps (Authorizer.send_local_list_in_steps, the store's
StagedLocalList), on a real store: whatever reads the list between the steps (a swipe's
lookup, GetLocalListVersion) sees the list as it was until the last step's commit; a
refused, cancelled or interrupted update leaves it so; a transaction message queued
meanwhile is committed at once; a copy of the state file taken mid-update (what a SIGKILL
leaves) holds the old list and the message."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.features.local_auth_list import authorizer as authorizer_module
from agent.features.local_auth_list.authorizer import Authorizer
from agent.features.registry import ConfigKeys
from agent.store import AuthEntry, Store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
#: Long enough for many steps (the first step checks FIRST_STEP_ENTRIES entries).
LONG = 6000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "state")
    yield s
    s.close()


def make(store: Store, **keys: object) -> Authorizer:
    limits: dict[str, object] = {"SendLocalListMaxLength": 10_000, "LocalAuthListMaxLength": 10_000}
    return Authorizer(store=store, keys=ConfigKeys(overrides={**limits, **keys}), now=lambda: NOW)


def entry(tag: str, status: str | None = "Accepted") -> dict[str, Any]:
    return {"idTag": tag} if status is None else {"idTag": tag, "idTagInfo": {"status": status}}


def tags(count: int, prefix: str = "N") -> list[dict[str, Any]]:
    return [entry(f"{prefix}{n:07d}") for n in range(count)]


async def run_steps(count: int) -> None:
    """Let a stepwise update run ``count`` of its steps: it yields to the event loop once
    per step, so each turn of the loop is one step (a count of steps, not a time)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def update_under_way(auth: Authorizer, count: int) -> asyncio.Task[str]:
    """A list of one entry "OLD" (version 1), then a Full update to version 2 of LONG
    entries started and run ``count`` steps: it is still under way."""
    assert auth.send_local_list(1, "Full", [entry("OLD")]) == "Accepted"
    task = asyncio.ensure_future(auth.send_local_list_in_steps(2, "Full", tags(LONG)))
    await run_steps(count)
    assert not task.done()
    return task


async def while_applied(
    auth: Authorizer, version: int, kind: str, items: list[dict[str, Any]],
    seen: Callable[[], str],
) -> tuple[str, int]:  # fmt: skip
    """Apply the list in steps, calling ``seen`` between every two steps: it says which
    list it saw, "old" or "new" (and fails on anything else). The outcome, and how often
    the old list was seen while the update was under way (never after the new one)."""
    task = asyncio.ensure_future(auth.send_local_list_in_steps(version, kind, items))
    lists: list[str] = []
    while not task.done():
        lists.append(seen())
        await run_steps(1)
    if "new" in lists:
        assert "old" not in lists[lists.index("new") :], lists
    return task.result(), lists.count("old")


def lists_seen(auth: Authorizer, version: int, kept: str, new: str) -> Callable[[], str]:
    """Which list a swipe of ``kept`` and ``new`` and GetLocalListVersion see: "old"
    (version ``version``, ``kept`` on it, ``new`` not) or "new" (the other way round)."""

    def seen() -> str:
        state = (auth.offline(kept).source, auth.offline(new).source, auth.list_version())
        assert state in (("list", "unknown", version), ("unknown", "list", version + 1)), state
        return "old" if state[0] == "list" else "new"

    return seen


def old_list_seen(auth: Authorizer, version: int, kept: str, new: str) -> Callable[[], str]:
    """Only the old list is seen: the update is refused (``new`` is never on it)."""

    def seen() -> str:
        state = (auth.offline(kept).source, auth.offline(new).source, auth.list_version())
        assert state == ("list", "unknown", version), state
        return "old"

    return seen


async def test_lookups_during_a_long_full_update_see_the_old_list(store: Store) -> None:
    auth = make(store)
    assert auth.send_local_list(1, "Full", [entry("OLD"), entry("ALSO-OLD", "Blocked")]) == (
        "Accepted"
    )
    seen = lists_seen(auth, 1, "OLD", "N0000000")
    result, between = await while_applied(auth, 2, "Full", tags(LONG), seen)
    assert result == "Accepted"
    assert between > 3  # it did run in steps, and the old list was seen between them
    assert auth.offline("OLD").source == "unknown"
    assert auth.offline("n0005999") == auth.offline("N0005999")
    assert auth.offline("N0005999").source == "list"
    assert auth.list_version() == 2
    assert store.local_list_size() == LONG


async def test_lookups_during_a_long_differential_update_see_the_old_list(
    store: Store,
) -> None:
    auth = make(store)
    assert auth.send_local_list(1, "Full", tags(3000, "K")) == "Accepted"
    # Changes K0000000-K0001499 (a new case for one), removes K0001500-K0001999, adds 2000
    # new ones; K0002000-K0002999 stay as they were.
    diff = [entry(f"K{n:07d}", "Blocked") for n in range(1, 1500)] + [entry("k0000000", "Expired")]
    diff += [entry(f"K{n:07d}", None) for n in range(1500, 2000)] + tags(2000)
    assert len(diff) > authorizer_module.REBUILD_ENTRIES  # the list is written afresh
    seen = lists_seen(auth, 1, "K0001700", "N0000000")
    result, between = await while_applied(auth, 2, "Differential", diff, seen)
    assert result == "Accepted" and between > 3
    entries = store.local_list_entries()
    expected = {f"K{n:07d}": AuthEntry("Blocked", None, None) for n in range(1, 1500)}
    expected["k0000000"] = AuthEntry("Expired", None, None)
    expected.update({f"K{n:07d}": AuthEntry("Accepted", None, None) for n in range(2000, 3000)})
    expected.update({f"N{n:07d}": AuthEntry("Accepted", None, None) for n in range(2000)})
    assert entries == expected
    assert auth.list_version() == 2


async def test_a_short_differential_update_changes_the_list_in_place(store: Store) -> None:
    auth = make(store)
    assert auth.send_local_list(1, "Full", tags(3000, "K")) == "Accepted"
    diff = [entry("k0000001", "Blocked"), entry("K0000002", None), entry("NEW")]
    assert await auth.send_local_list_in_steps(2, "Differential", diff) == "Accepted"
    entries = store.local_list_entries()
    assert entries["k0000001"] == AuthEntry("Blocked", None, None)
    assert "K0000001" not in entries and "K0000002" not in entries
    assert entries["NEW"] == AuthEntry("Accepted", None, None)
    assert len(entries) == 3000
    assert auth.list_version() == 2


@pytest.mark.parametrize(
    ("kind", "bad"),
    [
        ("Full", {"idTag": "N0005998", "idTagInfo": {"status": "Maybe"}}),  # not a status
        ("Full", entry("n0000007")),  # an idTag given twice
        ("Full", entry("N9999999", None)),  # no idTagInfo in a Full update
        ("Differential", {"idTag": "X" * 21, "idTagInfo": {"status": "Accepted"}}),
    ],
)
async def test_a_long_update_refused_at_its_end_changes_nothing(
    store: Store, kind: str, bad: dict[str, Any]
) -> None:
    auth = make(store)
    assert auth.send_local_list(1, "Full", [entry("OLD")]) == "Accepted"
    items = [*tags(LONG - 1), bad]
    seen = old_list_seen(auth, 1, "OLD", "N0000000")
    result, between = await while_applied(auth, 2, kind, items, seen)
    assert result == "Failed" and between > 3
    assert store.local_list_entries() == {"OLD": AuthEntry("Accepted", None, None)}
    assert auth.list_version() == 1
    # Nothing is left behind: the next update goes through.
    assert await auth.send_local_list_in_steps(3, kind, tags(LONG)) == "Accepted"
    assert store.local_list_size() == LONG + (kind == "Differential")


async def test_a_long_differential_update_over_the_maximum_changes_nothing(
    store: Store,
) -> None:
    auth = make(store, LocalAuthListMaxLength=5000)
    assert auth.send_local_list(1, "Full", tags(3000, "K")) == "Accepted"
    result, _ = await while_applied(
        auth, 2, "Differential", tags(2001), old_list_seen(auth, 1, "K0000001", "N0000000")
    )
    assert result == "Failed"
    assert store.local_list_size() == 3000 and auth.list_version() == 1


async def test_a_cancelled_update_changes_nothing(store: Store) -> None:
    auth = make(store)
    task = await update_under_way(auth, 4)
    task.cancel()  # the connection closed
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.local_list_entries() == {"OLD": AuthEntry("Accepted", None, None)}
    assert auth.list_version() == 1
    assert await auth.send_local_list_in_steps(3, "Full", tags(10)) == "Accepted"
    assert store.local_list_size() == 10 and auth.list_version() == 3


async def test_a_cancellation_at_any_step_comes_before_the_commit_or_after_the_answer(
    store: Store,
) -> None:
    """Cancelled (the connection closed, a Reset) between any two steps: either nothing
    changed, or the update had finished and its answer was ready. Never applied and
    unanswered: a CSMS sending the Differential update again would get VersionMismatch."""
    auth = make(store)
    assert auth.send_local_list(1, "Full", [entry("OLD")]) == "Accepted"
    version, steps = 1, 0
    while True:
        task = asyncio.ensure_future(auth.send_local_list_in_steps(version + 1, "Full", tags(2000)))
        await run_steps(steps)
        if task.done():
            assert task.result() == "Accepted"
            assert auth.list_version() == version + 1 and store.local_list_size() == 2000
            break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert auth.list_version() == version, f"cancelled after {steps} steps: applied"
        assert store.local_list_entries() == {"OLD": AuthEntry("Accepted", None, None)}
        steps += 1
    assert steps > 3  # it ran in steps


def copy_state(store: Store, to: Path) -> Path:
    """The state file as a SIGKILL now would leave it (its WAL: what was committed)."""
    to.mkdir()
    for suffix in ("", "-wal"):
        source = store.path.with_name(store.path.name + suffix)
        if source.exists():
            shutil.copyfile(source, to / source.name)
    return to


async def test_a_message_queued_during_an_update_is_committed_at_once(
    store: Store, tmp_path: Path
) -> None:
    auth = make(store)
    task = await update_under_way(auth, 3)
    stop = {"transactionId": 7, "meterStop": 1200, "timestamp": "2026-03-01T12:00:00Z"}
    seq = store.enqueue("StopTransaction", stop, None)
    crashed = copy_state(store, tmp_path / "crash")  # a SIGKILL now
    assert await task == "Accepted"
    after = Store.open(crashed)
    try:
        head = after.queue_head()
        assert head is not None and (head.seq, head.action) == (seq, "StopTransaction")
        assert after.local_list_entries() == {"OLD": AuthEntry("Accepted", None, None)}
        assert after.local_list_version() == 1
    finally:
        after.close()
    done = Store.open(copy_state(store, tmp_path / "done"))
    try:
        assert done.local_list_size() == LONG and done.local_list_version() == 2
    finally:
        done.close()


async def test_an_update_under_way_when_the_state_moves_to_memory_fails_cleanly(
    store: Store,
) -> None:
    """The disk refuses a write of something else mid-update: the state moves to memory
    (a copy without the staged entries), and the update answers Failed instead of applying
    half a list; the list is as it was, and the next update goes through (in memory)."""
    auth = make(store)
    task = await update_under_way(auth, 3)
    store._database.to_memory(sqlite3.OperationalError("disk I/O error"))  # as a failed write does
    assert await task == "Failed"
    assert store.write_error is not None
    assert store.local_list_entries() == {"OLD": AuthEntry("Accepted", None, None)}
    assert auth.list_version() == 1
    assert await auth.send_local_list_in_steps(3, "Full", tags(LONG)) == "Accepted"
    assert store.local_list_size() == LONG
