"""Power loss: a SIGKILL at any instant loses nothing that was committed and sends nothing
twice -- the agent as a real process (``python -m agent run``) against the test CSMS over
WSS, killed at random instants of many charging sessions and started again at once.

What a CSMS sees across such a kill (and across any connection drop):

- every StartTransaction, MeterValues and StopTransaction the agent committed, once, in
  the order taken, each with the timestamp of when it was taken;
- a transaction that was running is closed after the restart by a StopTransaction with
  reason PowerLoss, meterStop read from the meter (or, when the meter reads lower -- it was
  replaced or reset -- the last reading the transaction had);
- one kind of duplicate, which no charger can avoid: when the connection drops after the
  CSMS received a CALL and before its CALLRESULT was committed by the charger, the charger
  cannot know that it arrived, and sends it again after the reconnect -- unchanged
  (identical payload and timestamps) and as its first transaction message. A CSMS
  recognises it by its content. For a StartTransaction it should answer with the
  transactionId it gave the first time; this test CSMS gives a new one, and the agent
  uses the one it received (the first id then has no MeterValues or StopTransaction).

The campaign is seeded (``EVCP_POWERLOSS_SEED``, ``EVCP_POWERLOSS_KILLS``): the plan of each
life (when it is killed, which sessions it runs) comes from the seed; where in the protocol
each kill lands depends on timing, which is the point.

Also here: the store underneath (thinning, migration, a full disk, a second agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import trustme

from agent.control import request as control_request
from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms, Received
from agent.store import MIGRATIONS, Store, StoreInUse
from tests.conftest import CP_ID, PASSWORD, drain, server_context, write_config

TX_ACTIONS = ("StartTransaction", "MeterValues", "StopTransaction")
KILLS = int(os.environ.get("EVCP_POWERLOSS_KILLS", "100"))
SEED = int(os.environ.get("EVCP_POWERLOSS_SEED", "61850"))
TAGS = ("TAG-A", "TAG-B", "TAG-C", "TAG-D")
QUEUED = re.compile(r"queued (\w+) #(\d+) of transaction (\d+) taken at (\S+)")


# ---------------------------------------------------------------------- the agent process
def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class AgentProcess:
    """``python -m agent run`` with its log (stderr) appended to one file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        #: Set in the agent's environment besides this process's (the unit's, say).
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.config.parent / "control.sock"

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a stale one from a killed life
        self._log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}  # fmt: skip
        env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log, env=env,
        )  # fmt: skip

    def _children(self) -> list[int]:
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return []

    async def kill(self) -> None:
        """SIGKILL the agent (a power cut, as far as it can tell) and wait until its
        simulator child has gone too (it exits when its stdin closes)."""
        assert self.proc is not None
        children = self._children()
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        for pid in children:
            deadline = time.monotonic() + 5
            while not dead(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if not dead(pid):  # pragma: no cover - the simulator normally exits at once
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._close_log()

    async def terminate(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:  # pragma: no cover
                await self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def control(self, payload: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        return await asyncio.to_thread(control_request, self.socket, payload, timeout_s=timeout_s)

    async def sim(self, cmd: str, **extra: Any) -> dict[str, Any]:
        return await self.control({"cmd": "sim", "request": {"cmd": cmd, **extra}})

    async def wait_socket(self, timeout_s: float = 20.0) -> None:
        """Until the control socket answers and the charge point runs (the socket answers
        from the start, while the agent may still wait for the clock)."""
        deadline = time.monotonic() + timeout_s
        while not await self._running():
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode})")
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not open its control socket")
            await asyncio.sleep(0.02)

    async def _running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            answer = await self.control({"cmd": "status"})
        except Exception:
            return False
        return answer.get("phase") == "running"

    async def wait_status(self, predicate: Any, timeout_s: float = 30.0) -> dict[str, Any]:
        await self.wait_socket()
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):
                status = await self.control({"cmd": "status"})
                if predicate(status):
                    return status
            if time.monotonic() > deadline:
                raise AssertionError("the agent's status never matched")
            await asyncio.sleep(0.1)


def agent_config(
    directory: Path,
    csms: Csms,
    ca_file: Path,
    cp_id: str = CP_ID,
    *,
    stage_flush_s: float = 0,
    **ocpp: Any,
) -> Path:
    """``stage_flush_s`` is ``[agent] queue_flush_s``: 0 (here the default), every message
    is on disk before it is sent; N, MeterValues are staged in ``directory/run``."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = {
        "MeterValueSampleInterval": 1,
        "MeterValuesSampledData": "Energy.Active.Import.Register,Power.Active.Import",
        "AllowOfflineTxForUnknownId": True,  # sessions may start before the CSMS answers
        **ocpp,
    }
    stage = f'queue_flush_s = {stage_flush_s}\nstage_dir = "{directory / "run"}"'
    path = write_config(directory, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file,
                        ocpp=keys, agent_extra=stage)  # fmt: skip
    text = path.read_text().replace('log_level = "debug"', 'log_level = "debug"\n'
                                    'log_target = "stderr"')  # fmt: skip
    text = text.replace(f'charge_point_id = "{CP_ID}"', f'charge_point_id = "{cp_id}"')
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- what the CSMS saw
@dataclass
class Seen:
    index: int
    connection: int
    action: str
    payload: dict[str, Any]

    @property
    def taken_at(self) -> str:
        if self.action == "MeterValues":
            return str(self.payload["meterValue"][0]["timestamp"])
        return str(self.payload["timestamp"])

    @property
    def content(self) -> str:
        return self.action + json.dumps(self.payload, sort_keys=True)


@dataclass
class Recorder:
    """Every transaction message the CSMS received, per charge point, with the connection
    it came on, and the transactionId the CSMS gave each StartTransaction."""

    csms: Csms
    seen: dict[str, list[Seen]] = field(default_factory=lambda: defaultdict(list))
    #: (charge point, StartTransaction timestamp) -> the transactionIds given, in order.
    ids_of_start: dict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def __post_init__(self) -> None:
        self.csms.listener = self.on_message

    def on_message(self, item: Received) -> None:
        if item.action not in TX_ACTIONS:
            return
        if item.action == "MeterValues" and "transactionId" not in item.payload:
            return  # not a transaction's
        seen = self.seen[item.charge_point_id]
        seen.append(Seen(len(seen), self.csms.connections, item.action, item.payload))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = csms_module._CsmsChargePoint.on_start

        @functools.wraps(original)
        def on_start(cp: Any, id_tag: str, **kwargs: Any) -> Any:
            result = original(cp, id_tag, **kwargs)
            self.ids_of_start[cp.id, kwargs["timestamp"]].append(int(result.transaction_id))
            return result

        monkeypatch.setattr(csms_module._CsmsChargePoint, "on_start", on_start)


def energy(payload: dict[str, Any]) -> int:
    for value in payload["meterValue"][0]["sampledValue"]:
        if value.get("measurand") == "Energy.Active.Import.Register":
            return int(value["value"])
    raise AssertionError(f"no energy register in {payload}")


@dataclass
class Tx:
    start: Seen | None = None
    meter_values: list[Seen] = field(default_factory=list)
    stops: list[Seen] = field(default_factory=list)


def check_campaign(recorder: Recorder, cp_id: str, log_text: str, kills: int) -> Counter[str]:
    """Every rule of the module docstring for one charge point (SIGKILLed ``kills`` times);
    returns counts."""
    seen = recorder.seen[cp_id]
    ids_of_start = {ts: ids for (cp, ts), ids in recorder.ids_of_start.items() if cp == cp_id}
    # 1. Duplicates: only a resend right after a reconnect, identical to the message that
    #    was the last one on the connection before.
    first: dict[str, Seen] = {}
    unique: list[Seen] = []
    resent = 0
    for item in seen:
        earlier = first.get(item.content)
        if earlier is None:
            first[item.content] = item
            unique.append(item)
            continue
        assert earlier.index == item.index - 1 and earlier.connection < item.connection, (
            f"{item.action} taken at {item.taken_at} received twice, not as a resend after"
            f" a reconnect: {earlier} / {item}"
        )
        resent += 1
    # 2. Group by transaction: a StartTransaction by its timestamp, the rest by the id.
    start_of_id = {tx_id: ts for ts, ids in ids_of_start.items() for tx_id in ids}
    txs: dict[str, Tx] = defaultdict(Tx)
    for item in unique:
        if item.action == "StartTransaction":
            key = item.payload["timestamp"]
            assert txs[key].start is None, f"two different StartTransactions at {key}"
            txs[key].start = item
            continue
        tx_id = item.payload["transactionId"]
        assert tx_id in start_of_id, f"{item.action} for transactionId {tx_id} nobody gave"
        key = start_of_id[tx_id]
        # The id the agent uses is the one of the answer it committed: the last given.
        assert tx_id == ids_of_start[key][-1], (item, ids_of_start[key])
        tx = txs[key]
        (tx.meter_values if item.action == "MeterValues" else tx.stops).append(item)
    # 3. Each transaction: Start first, MeterValues in order, exactly one Stop, last;
    #    consistent energy.
    reasons: Counter[str] = Counter()
    for key, tx in txs.items():
        assert tx.start is not None, f"MeterValues/StopTransaction without a start ({key})"
        assert len(tx.stops) == 1, f"transaction started at {key}: {len(tx.stops)} stops"
        start, stop = tx.start.payload, tx.stops[0]
        stamps = [mv.taken_at for mv in tx.meter_values]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
        assert all(tx.start.index < mv.index < stop.index for mv in tx.meter_values)
        assert tx.start.index < stop.index
        assert all(start["timestamp"] <= s <= stop.taken_at for s in stamps)
        readings = [energy(mv.payload) for mv in tx.meter_values]
        assert readings == sorted(readings), readings
        assert all(start["meterStart"] <= wh <= stop.payload["meterStop"] for wh in readings), (
            start,
            readings,
            stop.payload,
        )
        assert start["meterStart"] <= stop.payload["meterStop"]
        reasons[stop.payload["reason"]] += 1
    # 4. Nothing committed was lost: every message the agent logged as queued (the line is
    #    written after the commit) reached the CSMS.
    by_local: dict[int, str] = {}
    committed = 0
    for action, _seq, local, taken in QUEUED.findall(log_text):
        if action == "StartTransaction":
            by_local[int(local)] = taken
    cut_starts = 0
    for action, _seq, local, taken in QUEUED.findall(log_text):
        committed += 1
        key = by_local.get(int(local))
        if key is None and action != "StartTransaction":
            # The StartTransaction's own line was cut off by a kill right after its commit
            # (see below): the transaction is found by this message's own timestamp.
            key = next(
                (
                    k
                    for k, t in txs.items()
                    if taken in {m.taken_at for m in (*t.meter_values, *t.stops)}
                ),
                None,
            )
            if key is not None and key not in by_local.values():
                by_local[int(local)] = key
                cut_starts += 1
        assert key is not None and key in txs, f"transaction {local} never reached the CSMS"
        tx = txs[key]
        if action == "StartTransaction":
            assert tx.start is not None
        elif action == "MeterValues":
            assert taken in {mv.taken_at for mv in tx.meter_values}, (
                f"MeterValues of transaction {local} taken at {taken} was lost"
            )
        else:
            assert tx.stops[0].taken_at == taken, f"StopTransaction of {local} was lost"
    # ...and the log line was there to check: every transaction message the CSMS received
    # was committed first, and the line is written right after the commit (no await in
    # between), so a kill can cut off at most the one line of the commit it interrupted.
    assert cut_starts <= kills
    received = len(unique)
    assert committed >= received - kills, (
        f"{received} transaction messages received but only {committed} logged as queued:"
        " is the QUEUED pattern still the log line of agent/store.py?"
    )
    assert set(reasons) <= {"Local", "EVDisconnected", "PowerLoss"}, reasons
    return Counter(
        {
            "transactions": len(txs),
            "meter_values": sum(len(tx.meter_values) for tx in txs.values()),
            "committed": committed,
            "resent": resent,
            **{f"stop_{reason}": count for reason, count in reasons.items()},
        }
    )


# ---------------------------------------------------------------------- the campaign
@dataclass(frozen=True)
class Session:
    tag: str
    charge_s: float
    end: str  # "swipe", "unplug" or "none" (left running)
    pause_s: float


@dataclass(frozen=True)
class Life:
    kill_after_s: float
    sessions: tuple[Session, ...]


def plan(rng: random.Random, kills: int) -> list[Life]:
    lives = []
    for _ in range(kills):
        sessions = tuple(
            Session(
                rng.choice(TAGS),
                rng.uniform(0.5, 3.5),
                rng.choices(("swipe", "unplug", "none"), (4, 3, 3))[0],
                rng.uniform(0.0, 0.3),
            )
            for _ in range(3)
        )
        lives.append(Life(rng.uniform(0.2, 4.5), sessions))
    return lives


async def drive(agent: AgentProcess, life: Life) -> None:
    """Run the life's sessions through the control socket until the agent dies."""
    with contextlib.suppress(Exception):
        await agent.wait_socket()
        for session in life.sessions:
            await agent.sim("plug")
            await agent.control({"cmd": "swipe", "tag": session.tag})
            await asyncio.sleep(session.charge_s)
            if session.end == "swipe":
                await agent.control({"cmd": "swipe", "tag": session.tag})
            elif session.end == "unplug":
                await agent.sim("unplug")
            else:
                await asyncio.sleep(5)  # left running: the kill ends it
            await asyncio.sleep(session.pause_s)
            await agent.sim("unplug")


async def run_lives(agent: AgentProcess, lives: list[Life]) -> None:
    """Start, drive, SIGKILL, again; then let a last life deliver everything and stop."""
    for life in lives:
        await agent.start()
        driver = asyncio.create_task(drive(agent, life))
        await asyncio.sleep(life.kill_after_s)
        await agent.kill()
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver
    await agent.start()
    try:
        status = await agent.wait_status(
            lambda s: (
                s["csms"]["registered"]
                and s["queue"]["pending"] == 0
                and all(c["transaction_id"] is None for c in s["connectors"])
            ),
            timeout_s=60,
        )
    finally:
        await agent.terminate()
    assert status["queue"] == {"pending": 0, "failed": 0, "dropped": 0}


@pytest.mark.timeout(600)
async def test_sigkill_campaign_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two charge points (two agent processes, so that both cores work), each killed at
    random instants of its charging sessions, KILLS kills in all. The second stages its
    MeterValues in RAM (``queue_flush_s``), which a SIGKILL must not lose either."""
    cps = [f"CP-KILL-{n}" for n in range(2)]
    csms = Csms(passwords=dict.fromkeys(cps, PASSWORD))
    await csms.start(server_context(ca))
    recorder = Recorder(csms)
    recorder.install(monkeypatch)
    configs = [agent_config(tmp_path / cp, csms, ca_file, cp, stage_flush_s=10 * n)
               for n, cp in enumerate(cps)]  # fmt: skip
    agents = [AgentProcess(c, tmp_path / f"{cp}.log") for c, cp in zip(configs, cps, strict=True)]
    rng = random.Random(SEED)
    plans = [plan(rng, KILLS // len(cps) + (n < KILLS % len(cps))) for n in range(len(cps))]
    began = time.monotonic()
    try:
        await asyncio.gather(*(run_lives(a, p) for a, p in zip(agents, plans, strict=True)))
    finally:
        await csms.stop()
    counts: Counter[str] = Counter()
    for cp, agent, lives in zip(cps, agents, plans, strict=True):
        log_text = agent.log_path.read_text(errors="replace")
        counts += check_campaign(recorder, cp, log_text, kills=len(lives))
    print(f"\n{KILLS} kills (seed {SEED}) in {time.monotonic() - began:.0f} s: {dict(counts)}")
    assert counts["transactions"] >= KILLS // 2
    assert counts["stop_PowerLoss"] >= KILLS // 10
    assert counts["meter_values"] >= KILLS // 2
    assert counts["committed"] > 0  # rule 4 above ran
    assert csms.errors == []


@pytest.mark.timeout(120)
async def test_sigkill_mid_session_stops_with_power_loss_and_meter_reading(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    """After a SIGKILL the running transaction is closed with reason PowerLoss; meterStop
    is the meter's register (read after the restart), or -- when the meter reads lower
    (it was replaced or reset) -- the last reading the transaction had, so that it is never
    below a MeterValues already sent. The vehicle pauses before the kill, so both are the
    same number here."""
    agent = AgentProcess(agent_config(tmp_path / "agent", csms, ca_file), tmp_path / "agent.log")
    await agent.start()
    try:
        await agent.wait_status(lambda s: s["csms"]["registered"])
        await agent.sim("plug")
        await agent.control({"cmd": "swipe", "tag": "KILLED"})
        start = await csms.wait_message("StartTransaction")
        await csms.wait_message("MeterValues", lambda p: "transactionId" in p)
        await agent.sim("ev-pause")
        await agent.wait_status(lambda s: s["connectors"][0]["power_w"] == 0)
        mark = len(csms.received)
        await csms.wait_message("MeterValues", lambda p: "transactionId" in p, after=mark)
        mark = len(csms.received)
        last = await csms.wait_message("MeterValues", lambda p: "transactionId" in p, after=mark)
        await agent.kill()
        mark = len(csms.received)
        await agent.start()
        stop = await csms.wait_message("StopTransaction", after=mark, timeout_s=30)
    finally:
        await agent.terminate()
    assert stop.payload["reason"] == "PowerLoss"
    assert stop.payload["meterStop"] == energy(last.payload) >= start.payload["meterStart"]
    assert stop.payload["transactionId"] == last.payload["transactionId"]
    assert csms.errors == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("power_cut", [False, True], ids=["sigkill", "power-cut"])
async def test_staged_meter_values_across_a_sigkill_and_a_power_cut(
    tmp_path: Path, csms: Csms, ca: trustme.CA, ca_file: Path, power_cut: bool
) -> None:
    """``queue_flush_s = 10``: offline, the samples are staged in RAM and moved to the disk
    every 10 s. A SIGKILL loses none of them. A power cut (SIGKILL, and the RAM file gone)
    loses at most the samples of the last 10 s. Either way the StartTransaction, every
    sample kept, and a StopTransaction PowerLoss with meterStop from the meter are
    delivered, once, in order."""
    directory = tmp_path / "agent"
    agent = AgentProcess(agent_config(directory, csms, ca_file, stage_flush_s=10),
                         tmp_path / "agent.log")  # fmt: skip
    port = csms.port
    await agent.start()
    try:
        await agent.wait_status(lambda s: s["csms"]["registered"])
        assert (await agent.control({"cmd": "status"}))["storage"]["stage"] == str(
            directory / "run" / "stage.db"
        )
        await agent.sim("plug")
        await agent.control({"cmd": "swipe", "tag": "CUT"})
        start = await csms.wait_message("StartTransaction")
        await csms.wait_message("MeterValues", lambda p: "transactionId" in p)
        await csms.stop()
        await agent.wait_status(lambda s: not s["csms"]["connected"])
        await agent.wait_status(lambda s: s["queue"]["pending"] >= (14 if power_cut else 4),
                                timeout_s=30)  # fmt: skip
        killed_at = datetime.now(UTC)
        await agent.kill()
        if power_cut:
            for name in ("stage.db", "stage.db-wal"):
                (directory / "run" / name).unlink(missing_ok=True)
        log_text = agent.log_path.read_text(errors="replace")
        mark = len(csms.received)
        await csms.start(server_context(ca), port=port)
        await agent.start()
        stop = await csms.wait_message("StopTransaction", after=mark, timeout_s=30)
        await agent.wait_status(lambda s: s["queue"]["pending"] == 0)
    finally:
        await agent.terminate()
    offline = [m.group(4) for m in QUEUED.finditer(log_text) if m.group(1) == "MeterValues"]
    delivered = [r.payload for r in csms.received[mark:] if r.action == "MeterValues"
                 and "transactionId" in r.payload]  # fmt: skip
    stamps = [p["meterValue"][0]["timestamp"] for p in delivered]
    sent_before = {p["meterValue"][0]["timestamp"] for r in csms.received[:mark]
                   if r.action == "MeterValues" for p in [r.payload]}  # fmt: skip
    if stamps and stamps[0] in sent_before:
        stamps = stamps[1:]  # in flight when the CSMS went away: sent again, unchanged
    unsent = [t for t in offline if t not in sent_before]
    assert stamps == unsent[: len(stamps)]  # in order, no gap, nothing twice
    lost = unsent[len(stamps) :]
    if power_cut:
        assert len(stamps) >= 5 and lost, (stamps, lost)  # some reached the disk, some not
        oldest_lost = datetime.fromisoformat(lost[0].replace("Z", "+00:00"))
        assert (killed_at - oldest_lost).total_seconds() <= 10 + 2  # within queue_flush_s
    else:
        assert len(stamps) >= 3 and lost == []
        assert "staged before the agent stopped" in agent.log_path.read_text()
    assert stop.payload["reason"] == "PowerLoss"
    assert stop.payload["transactionId"] == delivered[-1]["transactionId"]
    assert stop.payload["meterStop"] >= max(energy(p) for p in delivered)
    assert stop.payload["meterStop"] >= start.payload["meterStart"]
    assert csms.errors == []


# ---------------------------------------------------------------------- the store beneath
def mv(n: int) -> dict[str, Any]:
    return {"connectorId": 1, "transactionId": 0, "n": n,
            "meterValue": [{"timestamp": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}.000Z",
                            "sampledValue": [{"value": str(n)}]}]}  # fmt: skip


def test_thinning_spreads_over_the_outage(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.max_queue = 12
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    for n in range(1, 101):
        store.enqueue("MeterValues", mv(n), local)
    store.end_transaction(local, meter_stop_wh=100, stop_ts="t1", reason="Local",
                          stop_payload={"meterStop": 100})  # fmt: skip
    assert store.queue_dropped() == 102 - 12
    kept = [n for action, n in drain(store) if action == "MeterValues"]
    assert kept[0] == 1 and kept[-1] == 100 and kept == sorted(kept)
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    # Coarsened evenly, not a hole at the start: no gap more than twice another (the
    # newest samples are not thinned yet).
    assert max(gaps[:-2]) <= 2 * min(gaps[:-2]), kept
    store.close()


def test_note_meter_is_written_with_the_messages_not_at_every_poll(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=10,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    store.note_meter(local, 20, "t1")
    store.note_meter(local, 30, "t2")
    store.close()  # a crash now: the polls since the last message are not on disk
    store = Store.open(tmp_path)
    assert store.active_transactions()[0].last_meter_wh == 10
    store.note_meter(local, 40, "t3")
    store.enqueue("MeterValues", mv(1), local)  # committed with the reading
    store.close()
    store = Store.open(tmp_path)
    assert store.active_transactions()[0].last_meter_wh == 40
    store.close()


def test_migration_from_the_first_schema_keeps_the_queue(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "evcp.db", isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version=1; COMMIT;")
    for n in range(3):
        db.execute("INSERT INTO queue (action, payload, tx_local_id, created) VALUES"
                   " ('MeterValues', ?, NULL, 't')", (json.dumps({"n": n}),))  # fmt: skip
    db.execute("INSERT INTO auth_cache VALUES ('OLD', 'Accepted', NULL, NULL)")
    db.close()
    store = Store.open(tmp_path)
    assert [n for _, n in drain(store)] == [0, 1, 2]
    assert store.cache_get("old") == ("Accepted", None, None)
    assert store.local_list_version() == 0 and store.reservations() == []
    store.enqueue("MeterValues", {"n": 3}, None)
    assert [n for _, n in drain(store)] == [3]
    store.close()


def test_full_disk_carries_on_in_memory_and_writes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Store, "disk_retry_s", 0.0)
    store = Store.open(tmp_path)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    pages = store._disk.execute("PRAGMA page_count").fetchone()[0]
    store._disk.execute(f"PRAGMA max_page_count={pages}")
    for n in range(20):
        store.enqueue("MeterValues", mv(n), local)  # never raises
    assert store.storage_status()["on_disk"] is False
    assert "database or disk is full" in (store.write_error or "")
    assert caplog.text.count("cannot write the state file") == 1
    assert store.queue_counts() == (21, 0)
    store._disk.execute("PRAGMA max_page_count=1073741823")
    store.enqueue("MeterValues", mv(20), local)  # the next write goes back to disk
    assert store.storage_status() == {
        "path": str(store.path),
        "on_disk": True,
        "error": None,
        "stage": None,
    }
    store.close()
    store = Store.open(tmp_path)
    assert store.queue_counts() == (22, 0)
    store.close()


def test_a_full_disk_is_told_once_to_who_listens(tmp_path: Path) -> None:
    """The agent records it as a MemoryExhaustion security event: once when the state goes
    to memory, not at every write that finds the disk still full."""
    store = Store.open(tmp_path)
    seen: list[str] = []
    store.on_disk_full = seen.append
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None, start_payload={})  # fmt: skip
    pages = store._disk.execute("PRAGMA page_count").fetchone()[0]
    store._disk.execute(f"PRAGMA max_page_count={pages}")
    for n in range(20):
        store.enqueue("MeterValues", mv(n), local)
    assert store.storage_status()["on_disk"] is False
    assert len(seen) == 1 and "full" in seen[0]
    store.close()


def test_a_second_agent_on_the_same_state_is_refused_not_moved_aside(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.put("k", "v")
    with pytest.raises(StoreInUse, match="in use"):
        Store.open(tmp_path)
    assert not list(tmp_path.glob("evcp.db.corrupt-*"))
    store.close()
    again = Store.open(tmp_path)
    assert again.get("k") == "v"
    again.close()
