"""A SIGKILL at every step of the store: a child process runs a fixed story of two
transactions (samples staged and on disk, acknowledged from both, a flush that falls due, a
retry, a StopTransaction that moves the stage) and dies with ``os._exit`` at the K-th line
the store (any module of ``agent/store/``) executes -- for K = 1, 1 + STRIDE, ... until the
story ends. After each death the store is opened again (as the next run of the agent would)
and drained. Every time:

- nothing committed is lost: a message whose ``enqueue`` returned is delivered, unless the
  child was in the middle of acknowledging it;
- nothing acknowledged is sent again, nothing is sent twice, and the order is the order
  taken (and the seq order);
- the queue's counts match what is delivered.

Also without a stage (every message on disk), with staging turned off at the restart, and
with a power cut (the stage file gone too): then the only messages that may be lost are
samples still staged -- never one that a completed flush or StopTransaction took to the
disk, never a StartTransaction or StopTransaction.
``EVCP_STORE_KILL_STRIDE`` (default 3) sets how many kill points are skipped between two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store import Store

REPO = Path(__file__).resolve().parents[2]
STRIDE = int(os.environ.get("EVCP_STORE_KILL_STRIDE", "3"))

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import agent.store
from agent.store import Store

kill_at, work, flush_s = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
events = os.open(work / "events", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

def note(*what):  # unbuffered: what it says survives the kill
    os.write(events, (json.dumps(what) + "\n").encode())

executed = 0
package = os.path.dirname(agent.store.__file__) + os.sep  # every module of the store
def tracer(frame, event, arg):
    if not frame.f_code.co_filename.startswith(package):
        return None
    def line(frame, event, arg):
        global executed
        if event == "line":
            executed += 1
            if executed == kill_at:
                os._exit(9)
        return line
    return line

store = Store.open(work / "state")
if flush_s:
    store.stage(work / "run" / "stage.db", flush_s)
sys.settrace(tracer)

def mv(n):
    return {"connectorId": 1, "transactionId": 0, "n": n,
            "meterValue": [{"timestamp": "2026-01-01T00:00:00Z", "sampledValue": [{"value": str(n)}]}]}

def ack():
    head = store.queue_head()
    note("acking", head.payload["n"])
    if head.action == "StartTransaction":
        store.start_delivered(head.seq, head.tx_local_id, 77)
    else:
        store.queue_done(head.seq)
    note("acked", head.payload["n"])

def queue(n, local):
    note("queueing", n)
    store.enqueue("MeterValues", mv(n), local)
    note("queued", n)

def begin(name):
    note("queueing", name)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0, start_ts="t0",
                                    reservation_id=None, start_payload={"n": name})
    note("queued", name)
    return local

local = begin("start1")
ack()
for n in (1, 2, 3):
    store.note_meter(local, n * 10, f"t{n}")
    queue(n, local)
ack()                                  # sample 1, from the stage
time.sleep(max(flush_s, 0) + 0.01)
store.note_meter(local, 40, "t4")      # a flush falls due: 2 and 3 to the disk
note("moved")
queue(4, local)
ack()                                  # sample 2, from the disk
queue(5, local)
head = store.queue_head()
store.queue_attempt(head.seq, "no answer", give_up=False)
note("queueing", "stop1")
store.end_transaction(local, meter_stop_wh=99, stop_ts="t9", reason="Local",
                      stop_payload={"n": "stop1"})
note("queued", "stop1")
local = begin("start2")
queue(6, local)
queue(7, local)
ack()
ack()
queue(8, local)
store.close()
note("end")
os._exit(0)
"""


def life(work: Path, kill_at: int, flush_s: float, restart: str) -> tuple[bool, list[str]]:
    """One death at ``kill_at`` and one restart; ``(the story ended, problems)``."""
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(kill_at), str(work), str(flush_s)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode in (0, 9), done.stderr
    lines = (work / "events").read_text().splitlines() if (work / "events").exists() else []
    events = [json.loads(line) for line in lines]
    taken = [e[1] for e in events if e[0] == "queueing"]
    committed = {e[1] for e in events if e[0] == "queued"}
    acking = {e[1] for e in events if e[0] == "acking"}
    acked = {e[1] for e in events if e[0] == "acked"}

    store = Store.open(work / "state")
    stage = work / "run" / "stage.db"
    if restart == "power-cut":  # the tmpfs is gone with the power
        for name in ("stage.db", "stage.db-wal"):
            (work / "run" / name).unlink(missing_ok=True)
        store.stage(stage, 300)
    elif restart == "staged":
        store.stage(stage, 300)
    elif stage.exists():  # staging turned off: what is there is moved, once
        store.stage(stage, 0)
    pending, _failed = store.queue_counts()
    got: list[tuple[int, object]] = []
    while (head := store.queue_head()) is not None and len(got) < 50:
        got.append((head.seq, head.payload["n"]))
        store.queue_done(head.seq)
    store.close()

    names = [n for _, n in got]
    problems = []
    if len(set(names)) != len(names):
        problems.append(f"sent twice: {names}")
    if [seq for seq, _ in got] != sorted(seq for seq, _ in got):
        problems.append(f"out of seq order: {got}")
    if names != [n for n in taken if n in names]:
        problems.append(f"out of order: {names}")
    lost = (committed - acking) - set(names)
    if restart == "power-cut":
        # Only samples still staged at the cut may be lost: not one queued before a move
        # to disk that completed (the flush that fell due, a StopTransaction), not a Start
        # or a Stop.
        moves = [i for i, e in enumerate(events) if e in (["moved"], ["queued", "stop1"])]
        on_disk = {e[1] for i, e in enumerate(events) if e[0] == "queued" and moves
                   and i < moves[-1]}  # fmt: skip
        lost = {n for n in lost if not isinstance(n, int) or n in on_disk}
    if lost:
        problems.append(f"lost: {sorted(map(str, lost))}")
    if again := acked & set(names):
        problems.append(f"sent again after its CALLRESULT: {sorted(map(str, again))}")
    if pending != len(names):
        problems.append(f"counted {pending} pending, delivered {len(names)}")
    return bool(events) and events[-1] == ["end"], problems


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("flush_s", "restart", "stride"),
    [
        (0.05, "staged", STRIDE),
        (0.05, "off", STRIDE * 2),
        (0, "disk", STRIDE * 2),
        (0.05, "power-cut", STRIDE * 2),
    ],
    ids=["staged", "staged-then-off", "disk-only", "staged-power-cut"],
)
def test_a_sigkill_at_any_step_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, flush_s: float, restart: str, stride: int
) -> None:
    failures = []
    kill_at = 1
    while True:
        ended, problems = life(tmp_path / str(kill_at), kill_at, flush_s, restart)
        if problems:
            failures.append(f"killed at step {kill_at}: {'; '.join(problems)}")
        if ended:
            break
        kill_at += stride
    assert kill_at > 100  # the story really ran (and was killed at many steps)
    assert failures == []
