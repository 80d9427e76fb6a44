"""`evcp schedule`: the composite schedule of the running agent, as JSON, table and plot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, RunningAgent


def evcp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


async def test_schedule_json_table_and_plot(booted: RunningAgent, csms: Csms) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    profile = {
        "chargingProfileId": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "chargingRateUnit": "A", "startSchedule": start.isoformat(),
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10},
                                       {"startPeriod": 3600, "limit": 16}],
            "duration": 7200,
        },
    }  # fmt: skip
    result = await csms.call(CP_ID, call.SetChargingProfile(connector_id=0,
                                                           cs_charging_profiles=profile))  # fmt: skip
    assert result["status"] == "Accepted"
    done = await asyncio.to_thread(evcp, "schedule", "--config", str(booted.config), "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["connector_id"] == 1
    assert view["unit"] == "A"
    limits = [(p["start"], p["limit"]) for p in view["periods"]]
    assert [lim for _, lim in limits] == [32.0, 10.0, 16.0, 32.0]
    starts = [datetime.fromisoformat(s.replace("Z", "+00:00")) for s, _ in limits]
    assert starts[1] == start
    assert starts[2] == start + timedelta(hours=1)
    assert starts[3] == start + timedelta(hours=2)
    assert all(p["number_phases"] == 3 for p in view["periods"])

    done = await asyncio.to_thread(evcp, "schedule", "--config", str(booted.config))
    assert done.returncode == 0, done.stderr
    assert "10.0 A" in done.stdout
    assert "Limit per hour" in done.stdout  # the chart
    bars = [line for line in done.stdout.splitlines() if line.count("|") == 2]
    assert len(bars) == 24


async def test_schedule_without_agent_says_so(tmp_path: object) -> None:
    from pathlib import Path

    from tests.conftest import write_config

    config = write_config(Path(str(tmp_path)), url="wss://localhost:1/ocpp", ca_file=None)
    done = await asyncio.to_thread(evcp, "schedule", "--config", str(config), "--json")
    assert done.returncode == 1
    assert "not running" in done.stderr
    assert "Traceback" not in done.stderr
