"""Hostile and large CSMS input: figures (prints, never asserts). Issue 18.

1. Hostile frames per second and the agent's RSS over ``--frames`` (100,000) frames: the
   agent runs as ``python -m agent run`` (its own process, so its RSS is its own, with the
   ``Environment=`` of the shipped unit, as bench_agent.py runs it) on the
   simulated hardware against a local WSS CSMS, which sends the frames of
   tests/e2e/test_hostile.py (unknown and unsupported actions, 5,000-digit integers,
   NaN/Infinity, limits of 1e308, lone surrogates, control characters, reused ids) in
   chunks of 500, each followed by a GetConfiguration whose answer says the chunk was
   handled. RSS at start, after 2,000 frames of every kind (what is made once, on first
   use), highest while, and after.
2. SendLocalList of 1,000 and 10,000 entries, Full, and of 1,000 Differential
   (SendLocalListMaxLength 1,000: the 10,000 are refused), to the same process: time to the
   answer, what the answer was, RSS after.
3. The event loop's longest stall: the agent in this process (``app.run``), a 1 ms sleeper
   timing how late it wakes, while (a) 5,000 hostile frames, (b) each SendLocalList, of
   1,000 and 10,000 entries, Full then Differential (here SendLocalListMaxLength 10,000:
   all are accepted; the answer and the time to it in brackets), and
   (c) 500 staggered profiles and a GetCompositeSchedule are handled. (The CSMS shares the
   loop; its frames are serialised before the clock starts.) Target: 50 ms.

Usage: PYTHONPATH=. python bench/bench_hostile.py [--frames 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trustme
from bench_agent import unit_environment  # (this directory)
from ocpp.v16 import call

from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    PASSWORD,
    RunningAgent,
    server_context,
    start_charging,
    write_config,
)
from tests.e2e.test_hostile import KINDS, StallMonitor, hostile_frame, rss_kib, staggered_profile
from tests.e2e.test_powerloss import AgentProcess

#: The SendLocalLists sent: (entries, updateType, listVersion); the Differential ones set
#: the first entries of the Full ones to Blocked.
LISTS = [(1000, "Full", 1000), (10_000, "Full", 10_000), (1000, "Differential", 10_001),
         (10_000, "Differential", 10_002)]  # fmt: skip


def scratch(prefix: str, dir: Path | str | None = None) -> Path:
    """A temporary directory removed when the bench exits, after a failure too (atexit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class Answers:
    """Ids the agent answered (recorded in the CSMS's router), and when."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, Any]] = {}
        self.event = asyncio.Event()
        original = csms_module._CsmsChargePoint.route_message

        async def route_message(cp: Any, raw: str) -> None:
            frame = json.loads(raw)
            if isinstance(frame, list) and len(frame) > 2 and frame[0] in (3, 4):
                self.seen[str(frame[1])] = (time.perf_counter(), frame)
                self.event.set()
            await original(cp, raw)

        csms_module._CsmsChargePoint.route_message = route_message  # type: ignore[method-assign]

    async def wait(self, unique_id: str, timeout_s: float) -> tuple[float, Any] | None:
        deadline = time.perf_counter() + timeout_s
        while unique_id not in self.seen:
            self.event.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), left)
        return self.seen.pop(unique_id)


def forget_raw_answers(csms: Csms) -> None:
    cp = csms._cps.get(CP_ID)
    if cp is not None:
        while not cp._response_queue.empty():
            cp._response_queue.get_nowait()


def local_list(count: int, kind: str = "Full", version: int | None = None) -> str:
    """A SendLocalList of ``count`` entries, L0000000 on; a Differential one (a version above
    the Full ones) changes the first ``count`` to Blocked. Its message id: list-<kind>-<count>."""
    status = "Accepted" if kind == "Full" else "Blocked"
    entries = [{"idTag": f"L{n:07d}", "idTagInfo": {"status": status}} for n in range(count)]
    payload = {
        "listVersion": version or count, "updateType": kind, "localAuthorizationList": entries,
    }  # fmt: skip
    return json.dumps([2, f"list-{kind}-{count}", "SendLocalList", payload], separators=(",", ":"))


def describe(answer: tuple[float, Any] | None) -> str:
    if answer is None:
        return "no answer"
    frame = answer[1]
    return f"CALLERROR {frame[2]}" if frame[0] == 4 else f"CALLRESULT {frame[2]}"


async def probe(csms: Csms, answers: Answers, tag: str) -> bool:
    await csms.call_raw(CP_ID, json.dumps([2, tag, "GetConfiguration", {"key": []}]))
    found = await answers.wait(tag, 120)
    forget_raw_answers(csms)
    return found is not None


async def bench_process(
    work: Path, csms: Csms, ca_file: Path, frames: int, answers: Answers
) -> None:
    config = write_config(work, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    config.write_text(config.read_text().replace('log_level = "debug"', 'log_level = "info"'))
    agent = AgentProcess(config, work / "agent.log", env=unit_environment())
    await agent.start()
    try:
        await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, timeout_s=60)
        assert agent.proc is not None
        pid = agent.proc.pid
        await probe(csms, answers, "warm")
        rng = random.Random(18)

        async def burst(count: int, tag: str) -> tuple[int, float, int]:
            """Send ``count`` frames; return how many were answered, the time, the
            highest RSS seen."""
            highest, sent = 0, 0
            t0 = time.perf_counter()
            while sent < count:
                for n in range(min(500, count - sent)):
                    kind = rng.choice([k for k in KINDS if k != "long_local_list"])
                    frame, _ = hostile_frame(kind, f"{tag}{sent + n}", rng.getrandbits(20))
                    await csms.call_raw(CP_ID, frame)
                sent += min(500, count - sent)
                if not await probe(csms, answers, f"probe-{tag}{sent}"):
                    print(f"  the agent stopped answering after {sent} frames")
                    break
                answers.seen.clear()
                highest = max(highest, rss_kib(pid))
            return sent, time.perf_counter() - t0, highest

        start = rss_kib(pid)
        # Every kind of frame once (the library's schema validator of each action is made
        # on first use and kept: a one-time cost, bounded by the number of actions).
        await burst(2000, "w")
        before = rss_kib(pid)
        sent, elapsed, highest = await burst(frames, "b")
        after = rss_kib(pid)
        print(f"1. {sent} hostile frames in {elapsed:.1f} s: {sent / elapsed:,.0f} frames/s")
        print(f"   agent RSS: {start / 1024:.1f} MiB at start, {before / 1024:.1f} MiB after"
              f" 2,000 frames of every kind (first uses), then {highest / 1024:.1f} MiB at"
              f" most while, {after / 1024:.1f} MiB after ({(after - before) / 1024:+.2f}"
              " MiB)")  # fmt: skip
        print("2. SendLocalList (SendLocalListMaxLength 1000), to the same process:")
        for count, kind, version in LISTS:
            if count > 1000 and kind != "Full":
                continue  # (refused as the Full one is)
            frame = local_list(count, kind, version)
            t0 = time.perf_counter()
            await csms.call_raw(CP_ID, frame)
            answer = await answers.wait(f"list-{kind}-{count}", 60)
            took = (answer[0] if answer else time.perf_counter()) - t0
            forget_raw_answers(csms)
            await asyncio.sleep(0)
            print(f"   {count:6d} entries, {kind:12s} ({len(frame) / 1024:.0f} KiB):"
                  f" {describe(answer)} in {took * 1000:.0f} ms;"
                  f" RSS after {rss_kib(pid) / 1024:.1f} MiB")  # fmt: skip
    finally:
        await agent.terminate()


async def stalls(work: Path, csms: Csms, ca_file: Path, answers: Answers) -> None:
    config = write_config(
        work, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file, connectors=2,
        ocpp={"MaxChargingProfilesInstalled": 500, "ChargeProfileMaxStackLevel": 100,
              "SendLocalListMaxLength": 10_000},
    )  # fmt: skip
    config.write_text(config.read_text().replace('log_level = "debug"', 'log_level = "warning"'))
    agent = await RunningAgent(config).start()
    try:
        await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 2, timeout_s=60)
        await start_charging(agent, csms)
        print("3. The event loop's longest stall (agent in this process; target 50 ms):")

        async def measured(
            what: str, work_: Callable[[], Awaitable[None]], outcome: list[str] | None = None
        ) -> None:
            async with StallMonitor().watching() as monitor:
                await work_()
            said = f" ({outcome[0]})" if outcome else ""
            print(f"   {what}: {monitor.longest * 1000:.1f} ms{said}")

        rng = random.Random(7)
        kinds = [k for k in KINDS if k != "long_local_list"]
        frames = [
            hostile_frame(rng.choice(kinds), f"s{n}", rng.getrandbits(20))[0] for n in range(5000)
        ]

        async def hostile() -> None:
            for n, frame in enumerate(frames):
                await csms.call_raw(CP_ID, frame)
                if n % 500 == 499:
                    await probe(csms, answers, f"stall-{n}")

        await measured("5,000 hostile frames", hostile)
        for count, kind, version in LISTS:
            frame = local_list(count, kind, version)
            outcome: list[str] = []

            async def send_list(
                frame: str = frame, uid: str = f"list-{kind}-{count}", outcome: list[str] = outcome
            ) -> None:
                t0 = time.perf_counter()
                await csms.call_raw(CP_ID, frame)
                answer = await answers.wait(uid, 60)
                took = (answer[0] if answer else time.perf_counter()) - t0
                outcome.append(f"{describe(answer)} in {took * 1000:.0f} ms")
                forget_raw_answers(csms)

            await measured(f"SendLocalList of {count} entries, {kind}", send_list, outcome)
        now = datetime.now(UTC).replace(microsecond=0)
        bodies = [staggered_profile(n, now) for n in range(500)]

        async def profiles() -> None:
            for connector, body in bodies:
                await csms.call(CP_ID, call.SetChargingProfile(connector_id=connector,
                                                               cs_charging_profiles=body))  # fmt: skip

        await measured("500 staggered SetChargingProfile", profiles)

        async def composite() -> None:
            await csms.call(CP_ID, call.GetCompositeSchedule(connector_id=1, duration=86400))

        await measured("GetCompositeSchedule over them (24 h)", composite)
    finally:
        await agent.stop()


async def main(frames: int) -> None:
    work = scratch("evcp-bench-hostile-")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    answers = Answers()
    csms = Csms(passwords={CP_ID: PASSWORD})
    await csms.start(server_context(ca))
    try:
        (work / "process").mkdir()
        await bench_process(work / "process", csms, ca_file, frames, answers)
        (work / "inproc").mkdir()
        await stalls(work / "inproc", csms, ca_file, answers)
    finally:
        await csms.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(args.frames))
    sys.exit(0)
