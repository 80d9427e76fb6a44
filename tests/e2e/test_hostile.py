"""A hostile CSMS against the running agent (issue 18): one answer of the right kind for
every CALL, a transaction that still delivers every message in order, bounded memory and
no event-loop stall.

The agent runs for real (``app.run`` in this event loop, or ``python -m agent run`` for the
memory test) on the simulated hardware, against the test CSMS over WSS. Hostile frames are
sent raw (``Csms.call_raw``); what the agent sends back is recorded in the CSMS's router.
Each generated frame carries the answer OCPP-J 1.6 (section 4.2.3, Table 7) requires of it,
so the expectation never comes from the code under test:

- an unknown action: CALLERROR NotImplemented; a known OCPP 1.6 action the charge point has
  no handler for (the CSMS sending a BootNotification): NotSupported;
- an integer of 5,000 digits: TypeConstraintViolation (Python cannot even parse it);
  ``NaN``/``Infinity`` (not JSON): FormationViolation; ``limit`` 1e308 (valid JSON, the
  library's ``multipleOf`` check raised): PropertyConstraintViolation;
- an idTag with a lone UTF-16 surrogate: PropertyConstraintViolation (no silent Accepted);
- control characters in a ChangeConfiguration key: an ordinary CALLRESULT;
- a SendLocalList over SendLocalListMaxLength: CALLRESULT Failed; a frame over the size
  limit: FormationViolation naming the limit;
- ids reused inside a batch (duplicates): one answer per CALL all the same.

The answers come from ``agent.ocpp.precheck``, wired into the adapter's ``route_frame``
(and the transport's ``max_size``, raised to four times its frame limit). Wall-clock figures are in bench/bench_hostile.py; the stall tests assert a bound five times
the 50 ms target so that a loaded machine does not fail them, while the stalls the issue
reports (0.4-3 s) do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ocpp.v16 import call

from agent.control import request as control_request
from agent.ocpp import csms as csms_module
from agent.ocpp import precheck as pc
from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    OCPP16_ERROR_CODES,
    AgentFactory,
    RunningAgent,
    start_charging,
    status_is,
    write_config,
)
from tests.e2e.test_powerloss import AgentProcess

#: Five times the 50 ms target (see the module's docstring).
STALL_LIMIT_S = 0.25
#: Actions only a charge point sends: a CSMS sending one is understood but not supported.
CP_ONLY = [
    "Authorize", "BootNotification", "DiagnosticsStatusNotification",
    "FirmwareStatusNotification", "Heartbeat", "MeterValues", "StartTransaction",
    "StatusNotification", "StopTransaction",
]  # fmt: skip
KINDS = [
    "unknown_action", "cp_only_action", "big_integer", "nan", "infinity", "huge_limit",
    "surrogate_id_tag", "control_key", "long_local_list", "plain",
]  # fmt: skip


def hostile_frame(kind: str, unique_id: str, salt: int) -> tuple[str, str]:
    """``(frame, the answer it must get)``: a CallError code, "result" or "Failed"."""
    uid = json.dumps(unique_id)
    if kind == "unknown_action":
        action = "Frob" + "".join(chr(ord("a") + (salt >> k) % 26) for k in range(0, 30, 5))
        return f'[2, {uid}, "{action}", {{}}]', "NotImplemented"
    if kind == "cp_only_action":
        return f'[2, {uid}, "{CP_ONLY[salt % len(CP_ONLY)]}", {{}}]', "NotSupported"
    if kind == "big_integer":
        digits = "9" * (4301 + salt % 3000)
        return f'[2, {uid}, "GetConfiguration", {{"key": [{digits}]}}]', "TypeConstraintViolation"
    if kind in ("nan", "infinity"):
        token = "NaN" if kind == "nan" else ("Infinity", "-Infinity")[salt % 2]
        return (
            f'[2, {uid}, "RemoteStopTransaction", {{"transactionId": {token}}}]',
            "FormationViolation",
        )
    if kind == "huge_limit":
        value = ("1e308", "-1e308", "1e30", "123456789012345678901234567890.5")[salt % 4]
        profile = (
            '{"chargingProfileId": 90, "stackLevel": 0, "chargingProfilePurpose":'
            ' "TxDefaultProfile", "chargingProfileKind": "Relative", "chargingSchedule":'
            ' {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0,'
            f' "limit": {value}}}]}}}}'
        )
        if salt % 2:
            payload = f'{{"connectorId": 0, "csChargingProfiles": {profile}}}'
            return f'[2, {uid}, "SetChargingProfile", {payload}]', "PropertyConstraintViolation"
        payload = f'{{"idTag": "TAG-H", "chargingProfile": {profile}}}'
        return f'[2, {uid}, "RemoteStartTransaction", {payload}]', "PropertyConstraintViolation"
    if kind == "surrogate_id_tag":
        tag = "T" + chr(0xD800 + salt % 0x800) + "G"[: salt % 2]
        frame = json.dumps([2, unique_id, "RemoteStartTransaction", {"idTag": tag}])
        return frame, "PropertyConstraintViolation"
    if kind == "control_key":
        key = ("Heartbeat\nInterval", "X\r\n2026-12-06 ERROR evcp: forged", "\x1b[2J\x07Key")[
            salt % 3
        ]
        frame = json.dumps([2, unique_id, "ChangeConfiguration", {"key": key, "value": "1"}])
        return frame, "result"
    if kind == "long_local_list":
        entries = [{"idTag": f"H{n:06d}"} for n in range(1001 + salt % 50)]
        payload = {"listVersion": 5, "updateType": "Full", "localAuthorizationList": entries}
        return json.dumps([2, unique_id, "SendLocalList", payload]), "Failed"
    return json.dumps([2, unique_id, "GetConfiguration", {"key": ["HeartbeatInterval"]}]), "result"


@dataclass
class Wire:
    """Every frame the agent sent to the CSMS, parsed (recorded in the CSMS's router)."""

    frames: list[Any] = field(default_factory=list)

    def answers(self, since: int = 0) -> list[list[Any]]:
        return [
            f for f in self.frames[since:] if isinstance(f, list) and len(f) > 1 and f[0] in (3, 4)
        ]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    recorder = Wire()
    original = csms_module._CsmsChargePoint.route_message

    async def route_message(self: Any, raw_msg: str) -> None:
        recorder.frames.append(json.loads(raw_msg))
        await original(self, raw_msg)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "route_message", route_message)
    return recorder


def kind_of(answer: list[Any]) -> str:
    if answer[0] == 4:
        return str(answer[2])
    payload = answer[2]
    return "Failed" if isinstance(payload, dict) and payload.get("status") == "Failed" else "result"


async def probe(csms: Csms, wire: Wire, mark: int, probe_id: str, timeout_s: float = 30) -> None:
    """Send a GetConfiguration and wait for its answer: the agent handles frames in order,
    so every frame sent before has been answered by then."""
    await csms.call_raw(CP_ID, json.dumps([2, probe_id, "GetConfiguration", {"key": []}]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not any(a[1] == probe_id for a in wire.answers(mark)):
        assert loop.time() < deadline, f"no answer to {probe_id}"
        await asyncio.sleep(0.01)
    # The test CSMS's library queues the answers to raw CALLs for its own next call, and
    # skips them recursively there (one stack frame each): forget them.
    queue = csms._cps[CP_ID]._response_queue
    while not queue.empty():
        queue.get_nowait()


def meter_times(csms: Csms, tx_id: int) -> list[datetime]:
    return [
        datetime.fromisoformat(p["meterValue"][0]["timestamp"].replace("Z", "+00:00"))
        for p in csms.messages("MeterValues")
        if p.get("transactionId") == tx_id
    ]


def check_answers(wire: Wire, mark: int, sent: list[tuple[str, str]], what: Any) -> None:
    answers = [a for a in wire.answers(mark) if not str(a[1]).startswith("probe")]
    got = Counter((a[1], kind_of(a)) for a in answers)
    expected = Counter((_id(frame), kind) for frame, kind in sent)
    assert got == expected, f"answers {answers!r} for {what!r}"
    for answer in answers:
        if answer[0] == 4:
            assert len(answer) == 5 and answer[2] in OCPP16_ERROR_CODES, answer
            assert answer[3] == pc.DESCRIPTIONS[answer[2]], answer


_ID = re.compile(r'\[2, ("(?:[^"\\]|\\.)*")')


def _id(frame: str) -> str:
    """The unique id of a generated CALL (read without parsing: some cannot be parsed)."""
    match = _ID.match(frame)
    assert match is not None
    return str(json.loads(match.group(1)))


@dataclass
class Progress:
    probes: int = 0
    tx_id: int | None = None


@pytest.fixture
def progress() -> Progress:
    return Progress()


ids = st.text(min_size=1, max_size=36).filter(lambda s: not s.startswith("probe"))
hostile = st.builds(hostile_frame, st.sampled_from(KINDS), ids, st.integers(0, 2**20))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # stateful agent: no shrinking
)
@given(batch=st.lists(hostile, min_size=1, max_size=12), duplicate=st.booleans())
async def test_every_hostile_call_gets_one_answer_of_the_right_kind(
    booted: RunningAgent,
    csms: Csms,
    wire: Wire,
    progress: Progress,
    batch: list[tuple[str, str]],
    duplicate: bool,
) -> None:
    if progress.tx_id is None:
        progress.tx_id = await start_charging(booted, csms)
    if duplicate:  # the same frames again, same ids: each CALL is answered on its own
        batch = batch + batch
    connections = csms.connections
    mark = len(wire.frames)
    for frame, _kind in batch:
        await csms.call_raw(CP_ID, frame)
    progress.probes += 1
    await probe(csms, wire, mark, f"probe-{progress.probes}")
    assert booted.task is not None and not booted.task.done()
    assert csms.connections == connections, "the agent reconnected"
    check_answers(wire, mark, batch, batch)
    # The transaction goes on: still charging, its MeterValues in timestamp order.
    status = await booted.status()
    assert status["connectors"][0]["transaction_id"] == progress.tx_id
    times = meter_times(csms, progress.tx_id)
    assert times == sorted(times) and len(set(times)) == len(times)


def flood(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` hostile frames, a fifth of them reusing an earlier id."""
    out: list[tuple[str, str]] = []
    used: list[str] = []
    for n in range(count):
        unique_id = rng.choice(used) if used and rng.random() < 0.2 else f"h{n}-{rng.random()}"
        used.append(unique_id)
        out.append(hostile_frame(rng.choice(KINDS), unique_id, rng.getrandbits(20)))
    return out


async def test_a_transaction_delivers_every_message_in_order_through_a_flood(
    booted: RunningAgent, csms: Csms, wire: Wire
) -> None:
    tx_id = await start_charging(booted, csms)
    rng = random.Random(18)
    sent: list[tuple[str, str]] = []
    mark = len(wire.frames)
    # Chunks of 300 frames, each followed by a probe, until the transaction has sampled
    # MeterValues five times meanwhile (one a second).
    first = len(meter_times(csms, tx_id))
    while len(meter_times(csms, tx_id)) < first + 5:
        assert len(sent) < 60_000, "no MeterValues during the flood"
        frames = flood(rng, 300)
        for frame, _kind in frames:
            await csms.call_raw(CP_ID, frame)
        sent += frames
        await probe(csms, wire, mark, f"probe-flood-{len(sent)}", timeout_s=60)
    check_answers(wire, mark, sent, "the flood")
    # Stop; every transaction message is then delivered, none failed or dropped, in order.
    done = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert result["status"] == "Accepted"
    await csms.wait_message("StopTransaction", after=done, timeout_s=30)
    status = await booted.wait_status(lambda s: s["queue"]["pending"] == 0, timeout_s=30)
    assert status["queue"]["failed"] == 0 and status["queue"]["dropped"] == 0
    times = meter_times(csms, tx_id)
    assert len(times) >= first + 5
    assert times == sorted(times) and len(set(times)) == len(times)
    order = [r.action for r in csms.received if r.payload.get("transactionId") == tx_id]
    assert order[-1] == "StopTransaction" and order.count("StopTransaction") == 1


async def test_an_oversized_frame_gets_a_call_error_naming_the_limit(
    booted: RunningAgent, csms: Csms, wire: Wire
) -> None:
    limit = pc.frame_limit(1000)
    for size, unique_id in ((limit + 1, "over-1"), (int(1.5 * 2**20), "over-2")):
        head = f'[2, "{unique_id}", "DataTransfer", {{"vendorId": "v", "data": "'
        frame = head + "x" * (size - len(head) - 3) + '"}]'
        assert len(frame) == size
        mark = len(wire.frames)
        connections = csms.connections
        await csms.call_raw(CP_ID, frame)
        await probe(csms, wire, mark, f"probe-{unique_id}")
        answers = [a for a in wire.answers(mark) if a[1] == unique_id]
        assert len(answers) == 1 and answers[0][2] == "FormationViolation", answers
        assert str(limit) in json.dumps(answers[0][4])  # the limit is named
        assert csms.connections == connections  # answered, not cut off (1009)


# ---------------------------------------------------------------------------- stalls


class StallMonitor:
    """The longest time the event loop did not come back to a 1 ms sleep."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.longest = max(self.longest, loop.time() - before - 0.001)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[StallMonitor]:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0.01)
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def staggered_profile(n: int, now: datetime) -> tuple[int, dict[str, Any]]:
    """Profile ``n`` of 500 with 12 periods: every boundary its own (none coincide)."""
    purpose, connector = [
        ("ChargePointMaxProfile", 0), ("TxDefaultProfile", 0), ("TxDefaultProfile", 1),
        ("TxDefaultProfile", 2), ("TxProfile", 1),
    ][n % 5]  # fmt: skip
    start = now + timedelta(seconds=37 * n + 1)
    periods = [
        {"startPeriod": 0 if k == 0 else 600 * k + n, "limit": 6 + (n + k) % 26} for k in range(12)
    ]
    body = {
        "chargingProfileId": 1000 + n,
        "stackLevel": n // 5,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "startSchedule": start.isoformat().replace("+00:00", "Z"),
            "duration": 4 * 3600 + 13 * n,
            "chargingSchedulePeriod": periods,
        },
    }
    return connector, body


BIG_LIMITS = {
    "MaxChargingProfilesInstalled": 500,
    "ChargeProfileMaxStackLevel": 100,
    "SendLocalListMaxLength": 1000,
}


async def test_500_profiles_do_not_stall_the_event_loop(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent(connectors=2, ocpp=BIG_LIMITS)
    await csms.wait_message("StatusNotification", status_is(2, "Available"))
    await start_charging(agent, csms)
    now = datetime.now(UTC).replace(microsecond=0)
    async with StallMonitor().watching() as monitor:
        for n in range(500):
            connector, body = staggered_profile(n, now)
            result = await csms.call(
                CP_ID,
                call.SetChargingProfile(connector_id=connector, cs_charging_profiles=body),
                timeout_s=30,
            )
            assert result["status"] == "Accepted", (n, result)
        answer = await csms.call(
            CP_ID, call.GetCompositeSchedule(connector_id=1, duration=86400), timeout_s=30
        )
    assert answer["status"] == "Accepted"
    periods = answer["chargingSchedule"]["chargingSchedulePeriod"]
    assert len(periods) > 100  # the staggered profiles do show, one after the other
    assert monitor.longest < STALL_LIMIT_S, f"the event loop stalled {monitor.longest:.3f} s"


@pytest.mark.parametrize(("max_length", "expected"), [(1000, "Failed"), (10_000, "result")])
async def test_a_10000_entry_local_list_does_not_stall_the_event_loop(
    make_agent: AgentFactory, csms: Csms, wire: Wire, max_length: int, expected: str
) -> None:
    """Refused (over SendLocalListMaxLength) and accepted (SendLocalListMaxLength and
    LocalAuthListMaxLength 10,000)."""
    await make_agent(
        ocpp={
            **BIG_LIMITS,
            "SendLocalListMaxLength": max_length,
            "LocalAuthListMaxLength": max(10_000, max_length),
        }
    )
    await csms.wait_message("StatusNotification", status_is(1, "Available"))
    entries = [{"idTag": f"L{n:07d}", "idTagInfo": {"status": "Accepted"}} for n in range(10_000)]
    payload = {"listVersion": 7, "updateType": "Full", "localAuthorizationList": entries}
    frame = json.dumps([2, "big-list", "SendLocalList", payload], separators=(",", ":"))
    assert len(frame) < 2**20  # under the transport's frame limit today: the list is read
    mark = len(wire.frames)
    async with StallMonitor().watching() as monitor:
        await csms.call_raw(CP_ID, frame)
        await probe(csms, wire, mark, "probe-list")
    answers = [a for a in wire.answers(mark) if a[1] == "big-list"]
    assert [kind_of(a) for a in answers] == [expected]
    assert monitor.longest < STALL_LIMIT_S, f"the event loop stalled {monitor.longest:.3f} s"


# ---------------------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
async def agent_process(tmp_path: Path, csms: Csms, ca_file: Path) -> AsyncIterator[AgentProcess]:
    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    config.write_text(config.read_text().replace('log_level = "debug"', 'log_level = "info"'))
    agent = AgentProcess(config, tmp_path / "agent.log")
    await agent.start()
    try:
        yield agent
    finally:
        await agent.terminate()


def burst_frames(count: int, seed: int) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    kinds = [k for k in KINDS if k != "long_local_list"]  # (its own test above)
    for n in range(count):
        yield hostile_frame(rng.choice(kinds), f"m{seed}-{n}", rng.getrandbits(20))


async def test_memory_comes_back_after_a_long_hostile_burst(
    agent_process: AgentProcess, csms: Csms, wire: Wire
) -> None:
    await csms.wait_message("StatusNotification", status_is(1, "Available"), timeout_s=30)
    assert agent_process.proc is not None
    pid = agent_process.proc.pid

    async def burst(count: int, seed: int, samples: list[int]) -> None:
        sent: list[tuple[str, str]] = []
        mark = len(wire.frames)
        for n, (frame, kind) in enumerate(burst_frames(count, seed)):
            await csms.call_raw(CP_ID, frame)
            sent.append((frame, kind))
            if n % 200 == 199:  # keep pace with the agent; sample its memory meanwhile
                await probe(csms, wire, mark, f"probe-{seed}-{n}", timeout_s=60)
                check_answers(wire, mark, sent, f"burst {seed} up to frame {n}")
                samples.append(rss_kib(pid))
                sent.clear()
                mark = len(wire.frames)
        await probe(csms, wire, mark, f"probe-{seed}-end", timeout_s=60)
        check_answers(wire, mark, sent, f"the end of burst {seed}")

    warm: list[int] = []
    await burst(2000, 1, warm)  # every code path run once, caches filled
    gc.collect()
    before = rss_kib(pid)
    during: list[int] = []
    await burst(20_000, 2, during)
    after = rss_kib(pid)
    assert max(during) - before <= 4 * 1024, f"RSS rose {max(during) - before} KiB meanwhile"
    assert after - before <= 1024, f"RSS {before} KiB before, {after} KiB after"


# ------------------------------------------------------- accepted means done, or told


async def test_a_remote_start_with_a_lone_surrogate_is_refused_not_accepted(
    booted: RunningAgent, csms: Csms, wire: Wire
) -> None:
    """Valid JSON and valid against the schema, but no UTF-8 can carry the idTag: a
    CALLERROR, never an Accepted that then silently does nothing."""
    await booted.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"))
    mark, done = len(wire.frames), len(csms.received)
    frame = json.dumps(
        [2, "surrogate", "RemoteStartTransaction", {"idTag": "T\ud800", "connectorId": 1}]
    )
    await csms.call_raw(CP_ID, frame)
    await probe(csms, wire, mark, "probe-surrogate")
    answers = [a for a in wire.answers(mark) if a[1] == "surrogate"]
    assert [kind_of(a) for a in answers] == ["PropertyConstraintViolation"]
    assert not csms.messages("StartTransaction")
    status = await booted.status()
    assert status["connectors"][0]["transaction_id"] is None
    assert not [r for r in csms.received[done:] if r.action == "StatusNotification"]
    # The connector is free: the next (good) remote start charges.
    await start_charging(booted, csms)


@pytest.mark.parametrize(
    ("plugged", "authorize"),
    [(True, False), (False, False), (False, True)],
    ids=["plugged", "plugged-later", "authorized-first"],
)
async def test_a_start_that_fails_after_accepted_is_logged_and_reported(
    booted: RunningAgent,
    csms: Csms,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    plugged: bool,
    authorize: bool,
) -> None:
    """A start the agent accepted and then cannot make (here the store refuses an idTag
    it cannot encode) is logged and reported to the CSMS (StatusNotification OtherError
    with info, then NoError), and leaves the connector free, not half-started.

    The one stand-in: the pre-check is bypassed for this frame (what it was before issue
    18), so that an input the agent cannot store reaches the start for real; any other
    failure between the Accepted and the stored transaction takes the same path."""
    from agent.ocpp import adapter as adapter_module

    checked = adapter_module.precheck

    def without_the_surrogate_check(raw: str | bytes, **kwargs: Any) -> pc.Decision:
        if isinstance(raw, str) and '"lax-start"' in raw:
            return pc.Pass(json.loads(raw))
        return checked(raw, **kwargs)

    monkeypatch.setattr(adapter_module, "precheck", without_the_surrogate_check)
    if authorize:  # the tag is authorized (Authorize.req) before the start
        result = await csms.call(
            CP_ID, call.ChangeConfiguration(key="AuthorizeRemoteTxRequests", value="true")
        )
        assert result["status"] == "Accepted"
    if plugged:
        await booted.sim("plug")
        await csms.wait_message("StatusNotification", status_is(1, "Preparing"))
    mark = len(csms.received)
    frame = json.dumps(
        [2, "lax-start", "RemoteStartTransaction", {"idTag": "T\ud800", "connectorId": 1}]
    )
    await csms.call_raw(CP_ID, frame)
    if not plugged and not authorize:  # it waits for the cable, then fails
        await csms.wait_message("StatusNotification", status_is(1, "Preparing"), after=mark)
        await booted.sim("plug")
    report = await csms.wait_message(
        "StatusNotification", lambda p: p["errorCode"] == "OtherError", after=mark
    )
    assert report.payload["connectorId"] == 1
    assert "start failed" in report.payload["info"]
    # Preparing while a vehicle is plugged in (OCPP 1.6: no transaction yet), else free.
    expected = "Available" if authorize else "Preparing"
    assert report.payload["status"] == expected
    after = csms.received.index(report)
    await csms.wait_message(
        "StatusNotification", lambda p: p["errorCode"] == "NoError", after=after + 1
    )
    assert not csms.messages("StartTransaction")
    assert any(
        r.levelname == "ERROR"
        and ("could not start" in r.getMessage() or "was accepted but failed" in r.getMessage())
        for r in caplog.records
    ), caplog.text
    status = await booted.status()
    assert status["connectors"][0]["transaction_id"] is None
    assert status["connectors"][0]["status"] == expected
    # Nothing is left holding the connector: unplugged it is Available, and a good start
    # then charges.
    if expected == "Preparing":
        done = len(csms.received)
        await booted.sim("unplug")
        await csms.wait_message("StatusNotification", status_is(1, "Available"), after=done)
    else:  # not even waiting for a cable: the next plug-in starts nothing by itself
        done = len(csms.received)
        await booted.sim("plug")
        await csms.wait_message("StatusNotification", status_is(1, "Preparing"), after=done)
        assert (await booted.status())["connectors"][0]["transaction_id"] is None
        await booted.sim("unplug")
        await csms.wait_message("StatusNotification", status_is(1, "Available"), after=done)
    await start_charging(booted, csms)


def full_profile(n: int, now: datetime) -> tuple[int, dict[str, Any]]:
    """Profile ``n`` with ChargingScheduleMaxPeriods (48) periods."""
    connector, body = staggered_profile(n, now)
    body["chargingSchedule"]["chargingSchedulePeriod"] = [
        {"startPeriod": 0 if k == 0 else 300 * k + n % 7, "limit": 6 + (n + k) % 26}
        for k in range(48)
    ]
    return connector, body


#: What the agent's RSS may grow by, at most, for what a CSMS sends at the configured
#: limits (README, "Tests and benchmarks", has the measured figures): a refused 10,000-entry
#: SendLocalList costs nothing lasting; a list of SendLocalListMaxLength (1,000) entries
#: lives in SQLite (its page cache); MaxChargingProfilesInstalled (500 here) profiles of
#: ChargingScheduleMaxPeriods (48) periods are kept parsed in memory (measured +4.1 MiB;
#: +12 MiB when each kept its received body too).
REFUSED_LIST_KIB = 1024
ACCEPTED_LIST_KIB = 2048
PROFILES_500_KIB = 6144


@pytest.fixture
async def big_agent_process(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> AsyncIterator[AgentProcess]:
    config = write_config(
        tmp_path,
        url=f"wss://localhost:{csms.port}/ocpp",
        ca_file=ca_file,
        connectors=2,
        ocpp={**BIG_LIMITS, "MeterValueSampleInterval": 0},
    )
    config.write_text(config.read_text().replace('log_level = "debug"', 'log_level = "info"'))
    agent = AgentProcess(config, tmp_path / "agent.log")
    await agent.start()
    try:
        yield agent
    finally:
        await agent.terminate()


async def test_memory_is_bounded_by_the_limits_not_by_what_the_csms_sends(
    big_agent_process: AgentProcess, csms: Csms, wire: Wire
) -> None:
    await csms.wait_message("StatusNotification", status_is(2, "Available"), timeout_s=30)
    assert big_agent_process.proc is not None
    pid = big_agent_process.proc.pid

    async def send_list(count: int, unique_id: str, version: int) -> str:
        entries = [
            {"idTag": f"L{n:07d}", "idTagInfo": {"status": "Accepted"}} for n in range(count)
        ]
        payload = {"listVersion": version, "updateType": "Full", "localAuthorizationList": entries}
        mark = len(wire.frames)
        await csms.call_raw(CP_ID, json.dumps([2, unique_id, "SendLocalList", payload]))
        await probe(csms, wire, mark, f"probe-{unique_id}", timeout_s=60)
        return kind_of(next(a for a in wire.answers(mark) if a[1] == unique_id))

    now = datetime.now(UTC).replace(microsecond=0)

    async def install(numbers: range) -> None:
        for n in numbers:
            connector, body = full_profile(n, now)
            result = await csms.call(
                CP_ID,
                call.SetChargingProfile(connector_id=connector, cs_charging_profiles=body),
                timeout_s=30,
            )
            assert result["status"] == "Accepted", (n, result)

    # A transaction (TxProfiles need one), then every code path once (caches, the
    # library's schemas, SQLite's pages).
    answer = await asyncio.to_thread(
        control_request,
        big_agent_process.socket,
        {"cmd": "sim", "request": {"cmd": "plug", "connector": 1}},
    )
    assert answer.get("ok"), answer
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="MEM", connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("StartTransaction", timeout_s=30)
    assert await send_list(1000, "warm-list", 1) == "result"
    assert await send_list(10_000, "warm-refused", 2) == "Failed"
    await install(range(5))
    base = rss_kib(pid)
    assert await send_list(10_000, "refused", 3) == "Failed"
    refused = rss_kib(pid) - base
    assert await send_list(1000, "accepted", 4) == "result"
    accepted = rss_kib(pid) - base
    await install(range(5, 500))
    profiles = rss_kib(pid) - base
    print(f"RSS {base} KiB; +{refused} refused list, +{accepted} list, +{profiles} profiles")
    assert refused <= REFUSED_LIST_KIB, f"a refused 10,000-entry list: +{refused} KiB"
    assert accepted <= ACCEPTED_LIST_KIB, f"a 1,000-entry list: +{accepted} KiB"
    assert profiles - accepted <= PROFILES_500_KIB, f"500 profiles: +{profiles - accepted} KiB"
