"""Smart Charging figures (prints, never asserts).

1. SetChargingProfile to the new current written to the controller, over 1,000 changes
   (target p99 <= 10 ms). The real agent runs in this process (``agent.app.run``) on the
   simulated hardware (the simulator is a child process: RAPI over a pty, as a real
   controller on a serial line), against a local WSS CSMS. A TxProfile alternates between
   16 A and 10 A; each change is timed, in-process, with ``time.perf_counter``:

   - *frame received*: from the agent's adapter receiving the SetChargingProfile frame
     (before JSON parsing and the ``ocpp`` library's schema validation) ...
   - *handler*: from ``SmartCharging.set_charging_profile`` being called (validation, replacement,
     the SQLite commit, the actuation task spawned) ...
   - ... to ``RapiController.set_offered_current`` returning, i.e. the controller has
     answered ``$OK`` to ``$SC``: the new current is applied to the pilot.
   - *CSMS round trip*: from the CSMS sending the CALL to the current written (includes the
     CSMS's own work and the TLS WebSocket both ways; the CSMS shares the event loop).

2. The composite schedule with 20 installed profiles (MaxChargingProfilesInstalled):
   time per GetCompositeSchedule computation over 24 h, and per limit computation (what
   every actuation and period boundary costs).

3. GetCompositeSchedule with 20, 100 and 500 *staggered* profiles (48 periods each, no two
   boundaries at the same instant; all purposes, connector 1 during a transaction), 24 h:
   mean and longest single call of the sweep (``sc.composite``, what the agent runs, with
   its 1,000-period cap), and of the quadratic reference (``sc.composite_by_sampling``) for
   comparison. A call runs on the event loop: the target is 50 ms at the limits.

Usage: python bench/bench_smart_charging.py [--changes 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trustme
from ocpp.v16 import call

from agent import app
from agent.config import load
from agent.control import request
from agent.core import smart_charging as sc
from agent.features.registry import ConfigKeys
from agent.features.smart_charging.profiles import ChargingProfiles
from agent.features.smart_charging.service import SmartCharging
from agent.ocpp.adapter import OcppAdapter
from agent.ocpp.csms import Csms
from agent.store import Store
from drivers.evse.rapi import RapiController

CP = "BENCH-SC"
PASSWORD = "bench-password-0123456789"


def scratch(prefix: str, dir: Path | str | None = None) -> Path:
    """A temporary directory removed when the bench exits, after a failure too (atexit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tx_profile(limit_a: float) -> dict[str, Any]:
    return {
        "chargingProfileId": 1,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit_a}],
        },
    }


def percentiles(samples_s: list[float]) -> str:
    ms = sorted(x * 1000 for x in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    return (
        f"p50 {statistics.median(ms):6.2f} ms   p99 {p99:6.2f} ms   max {ms[-1]:6.2f} ms"
        f"   (n = {len(ms)})"
    )


async def bench_set_profile(changes: int) -> None:
    work = scratch("evcp-bench-sc-")
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    csms = Csms(passwords={CP: PASSWORD})
    await csms.start(ctx)
    config = work / "evcp.toml"
    config.write_text(f"""
[csms]
url = "wss://localhost:{csms.port}/ocpp"
charge_point_id = "{CP}"
password = "{PASSWORD}"
ca_file = "{work / "ca.pem"}"
[agent]
state_dir = "{work / "state"}"
control_socket = "{work / "control.sock"}"
stage_dir = "{work / "run"}"
log_level = "warning"
[time]
ntp_servers = []
[hardware]
driver = "sim"
meter_poll_s = 60
[ocpp]
MeterValueSampleInterval = 0
""")

    marks: dict[str, float] = {}
    written = asyncio.Event()
    route_frame = OcppAdapter.route_frame
    set_charging_profile = SmartCharging.set_charging_profile
    set_offered_current = RapiController.set_offered_current

    async def timed_route_frame(self: OcppAdapter, raw: str | bytes) -> None:
        if isinstance(raw, str) and '"SetChargingProfile"' in raw:
            marks["received"] = time.perf_counter()
        await route_frame(self, raw)

    def timed_set_charging_profile(
        self: SmartCharging, connector_id: int, body: dict[str, Any]
    ) -> str:
        marks["handler"] = time.perf_counter()
        try:
            return set_charging_profile(self, connector_id, body)
        finally:
            marks["handled"] = time.perf_counter()

    async def timed_set_offered_current(self: RapiController, current_a: float) -> float:
        applied = await set_offered_current(self, current_a)
        marks["written"] = time.perf_counter()
        written.set()
        return applied

    patches: list[tuple[type[Any], str, Callable[..., Any]]] = [
        (OcppAdapter, "route_frame", timed_route_frame),
        (SmartCharging, "set_charging_profile", timed_set_charging_profile),
        (RapiController, "set_offered_current", timed_set_offered_current),
    ]
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in patches]
    for cls, name, fn in patches:
        setattr(cls, name, fn)
    agent = asyncio.get_running_loop().create_task(app.run(load(config)))
    try:
        await csms.wait_message("StatusNotification", timeout_s=30)
        sock = work / "control.sock"
        await asyncio.to_thread(request, sock, {"cmd": "sim", "request": {"cmd": "plug"}})
        await csms.call(CP, call.RemoteStartTransaction(id_tag="BENCH", connector_id=1))
        await csms.wait_message(
            "StatusNotification", lambda p: p["status"] == "Charging", timeout_s=10
        )
        print(f"charging; timing {changes} SetChargingProfile changes", file=sys.stderr)
        from_frame: list[float] = []
        from_handler: list[float] = []
        in_handler: list[float] = []
        round_trip: list[float] = []
        for i in range(changes + 20):
            written.clear()
            marks.clear()
            sent = time.perf_counter()
            result = await csms.call(
                CP,
                call.SetChargingProfile(
                    connector_id=1, cs_charging_profiles=tx_profile(16.0 if i % 2 else 10.0)
                ),
            )
            assert result["status"] == "Accepted", result
            await asyncio.wait_for(written.wait(), 5)
            if i < 20:
                continue  # warm-up
            from_frame.append(marks["written"] - marks["received"])
            from_handler.append(marks["written"] - marks["handler"])
            in_handler.append(marks["handled"] - marks["handler"])
            round_trip.append(marks["written"] - sent)
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent
        for cls, name, fn in originals:
            setattr(cls, name, fn)
        await csms.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("SetChargingProfile -> new current written to the controller ($SC answered $OK),")
    print("measured in-process on the agent's event loop (target p99 <= 10 ms):")
    print(f"  from the frame received:         {percentiles(from_frame)}")
    print(f"  from set_charging_profile call:  {percentiles(from_handler)}")
    print(f"  from the CSMS sending it (WSS):  {percentiles(round_trip)}")
    print(f"  in set_charging_profile itself:  {percentiles(in_handler)}")
    print(f"  (checks, replacement and the SQLite commit, synchronous=FULL, in {work})")


def bench_composite(iterations: int) -> None:
    work = scratch("evcp-bench-composite-")
    store = Store.open(work)
    profiles = ChargingProfiles(store=store, keys=ConfigKeys(), connector_ids=[1, 2],
                                max_current_a=32, voltage_v=230, phases=3)  # fmt: skip
    now = datetime.now(UTC).replace(microsecond=0)
    tx = sc.Tx(1234, now - timedelta(minutes=20))

    def periods(count: int, step_s: int, base: float) -> list[dict[str, Any]]:
        return [
            {"startPeriod": k * step_s, "limit": base + (k % 7), "numberPhases": 3}
            for k in range(count)
        ]

    bodies: list[tuple[int, dict[str, Any]]] = []
    for n in range(20):
        purpose, connector = [
            ("ChargePointMaxProfile", 0), ("TxDefaultProfile", 0),
            ("TxDefaultProfile", 1), ("TxProfile", 1),
        ][n % 4]  # fmt: skip
        kind = ["Absolute", "Recurring", "Relative"][n % 3]
        if purpose == "ChargePointMaxProfile" and kind == "Relative":
            kind = "Absolute"
        schedule: dict[str, Any] = {
            "chargingRateUnit": "W" if n % 5 == 0 else "A",
            "chargingSchedulePeriod": periods(48, 1800, 6000.0 if n % 5 == 0 else 8.0),
        }
        body: dict[str, Any] = {
            "chargingProfileId": n + 1,
            "stackLevel": n // 4,
            "chargingProfilePurpose": purpose,
            "chargingProfileKind": kind,
            "chargingSchedule": schedule,
        }
        if kind != "Relative":
            schedule["startSchedule"] = (now - timedelta(hours=n)).isoformat()
        if kind == "Recurring":
            body["recurrencyKind"] = "Daily"
        bodies.append((connector, body))
    for connector, body in bodies:
        status = profiles.set(connector, body, tx if connector else None)
        assert status == "Accepted", (body, status)
    assert len(profiles.installed) == 20

    answer = profiles.composite(1, now, 86400, "A", tx)
    assert answer is not None
    count = len(answer[1]["chargingSchedulePeriod"])
    t0 = time.perf_counter()
    for _ in range(iterations):
        profiles.composite(1, now, 86400, "A", tx)
    per_composite = (time.perf_counter() - t0) / iterations
    t0 = time.perf_counter()
    for k in range(iterations * 100):
        profiles.limits(now + timedelta(seconds=k), {1: tx, 2: None},
                        hardware_max_a={1: 32, 2: 32}, charging=[1])  # fmt: skip
    per_limit = (time.perf_counter() - t0) / (iterations * 100)
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    print("Composite schedule with 20 installed profiles (48 periods each; Absolute, Daily")
    print("recurring and Relative; all three purposes; A and W), connector 1 during a")
    print(f"transaction, 24 h ({count} composite periods):")
    print(f"  GetCompositeSchedule computation: {per_composite * 1000:.2f} ms each")
    print(f"  limit now, for actuation:        {per_limit * 1e6:.1f} us each")


def staggered_profiles(count: int, now: datetime) -> list[sc.Profile]:
    """``count`` profiles whose 48 boundaries each fall at instants of their own."""
    out = []
    for n in range(count):
        purpose, connector = [
            (sc.CP_MAX, 0), (sc.TX_DEFAULT, 0), (sc.TX_DEFAULT, 1), (sc.TX, 1),
        ][n % 4]  # fmt: skip
        body = {
            "chargingProfileId": n + 1,
            "stackLevel": n // 4,
            "chargingProfilePurpose": purpose,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "startSchedule": (now + timedelta(seconds=37 * n + 1)).isoformat(),
                "duration": 20 * 3600 + 13 * n,
                "chargingSchedulePeriod": [
                    {"startPeriod": 0 if k == 0 else 1500 * k + n, "limit": 6.0 + (n + k) % 26}
                    for k in range(48)
                ],
            },
        }
        out.append(sc.parse_profile(connector, body))
    return out


def bench_staggered(iterations: int) -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    tx = sc.Tx(1234, now - timedelta(minutes=20))
    print("GetCompositeSchedule, 24 h, staggered profiles of 48 periods (connector 1, during a")
    print("transaction; cap 1,000 periods as the agent):")
    for count in (20, 100, 500):
        profiles = staggered_profiles(count, now)
        arguments: dict[str, Any] = {
            "connector_id": 1, "start": now, "duration_s": 86400, "tx": tx,
            "hardware_max_a": 32, "voltage_v": 230, "phases": 3, "max_periods": 1000,
        }  # fmt: skip
        rows = []
        for name, fn, runs in (
            ("sweep", sc.composite, iterations),
            ("reference", sc.composite_by_sampling, 1 if count == 500 else max(1, iterations // 5)),
        ):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                result = fn(profiles, **arguments)
                times.append(time.perf_counter() - t0)
            rows.append((name, statistics.mean(times), max(times), len(result.periods)))
        for name, mean, longest, periods in rows:
            print(f"  {count:3d} profiles, {name:9s}: mean {mean * 1000:8.2f} ms, longest call"
                  f" {longest * 1000:8.2f} ms ({periods} periods)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--composites", type=int, default=50)
    parser.add_argument("--only-composite", action="store_true",
                        help="skip the end-to-end SetChargingProfile part")  # fmt: skip
    args = parser.parse_args()
    if not args.only_composite:
        asyncio.run(bench_set_profile(args.changes))
    bench_composite(args.composites)
    bench_staggered(max(5, args.composites // 5))
