"""``evcp config get/set`` and ``evcp tx`` as a field engineer runs them over SSH: separate
processes against a running agent (the test CSMS, simulated hardware), with the JSON
contracts outside checks rely on, the tables, and the errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    PASSWORD,
    RunningAgent,
    start_charging,
    status_is,
    write_config,
)
from tests.e2e.test_cli import REPO, Result, config_of, evcp, offline_config

TX_FIELDS = {
    "transaction_id",
    "connector_id",
    "id_tag",
    "meter_start_wh",
    "meter_stop_wh",
    "reason",
    "delivered",
}


async def test_config_get_prints_the_keys_as_json(booted: RunningAgent) -> None:
    config = config_of(booted)
    one = await evcp("config", "get", "--config", config, "--json", "HeartbeatInterval")
    assert one.code == 0, one
    value = one.json()
    assert list(value) == ["HeartbeatInterval"] and isinstance(value["HeartbeatInterval"], str)
    assert int(value["HeartbeatInterval"]) > 0

    two = await evcp("config", "get", "--config", config, "--json",
                     "HeartbeatInterval", "MeterValueSampleInterval")  # fmt: skip
    assert set(two.json()) == {"HeartbeatInterval", "MeterValueSampleInterval"}, two

    every = await evcp("config", "get", "--config", config, "--json")
    keys = every.json()
    assert len(keys) > 20 and "NumberOfConnectors" in keys
    assert "AuthorizationKey" not in keys  # write-only
    assert PASSWORD not in every.out

    table = await evcp("config", "get", "--config", config)
    assert table.code == 0, table
    line = next(x for x in table.out.splitlines() if x.startswith("NumberOfConnectors "))
    assert line.split()[1] == "1" and "(read-only)" in line


async def test_config_get_of_an_unknown_key_is_a_usage_error(booted: RunningAgent) -> None:
    result = await evcp("config", "get", "--config", config_of(booted), "NoSuchKey")
    result.assert_clean_error(2, "NoSuchKey")


async def test_config_set_changes_a_key_like_change_configuration(
    booted: RunningAgent, csms: Csms
) -> None:
    config = config_of(booted)
    result = await evcp("config", "set", "--config", config, "MeterValueSampleInterval", "37")
    assert result.code == 0, result
    assert "MeterValueSampleInterval set (Accepted)" in result.out
    got = await evcp("config", "get", "--config", config, "--json", "MeterValueSampleInterval")
    assert got.json() == {"MeterValueSampleInterval": "37"}
    # The CSMS sees the same value.
    answer = await csms.call(CP_ID, call.GetConfiguration(key=["MeterValueSampleInterval"]))
    assert answer["configurationKey"][0]["value"] == "37"


async def test_config_set_refuses_a_bad_value_and_keeps_the_old(booted: RunningAgent) -> None:
    config = config_of(booted)
    before = (await evcp("config", "get", "--config", config, "--json", "HeartbeatInterval")).json()
    bad = await evcp("config", "set", "--config", config, "HeartbeatInterval", "soon")
    bad.assert_clean_error(2, "HeartbeatInterval", "Rejected")
    readonly = await evcp("config", "set", "--config", config, "NumberOfConnectors", "4")
    readonly.assert_clean_error(2, "NumberOfConnectors")
    unknown = await evcp("config", "set", "--config", config, "NoSuchKey", "1")
    unknown.assert_clean_error(2, "NoSuchKey", "NotSupported")
    after = (await evcp("config", "get", "--config", config, "--json", "HeartbeatInterval")).json()
    assert after == before


async def test_config_set_of_the_authorization_key_is_write_only(booted: RunningAgent) -> None:
    config = config_of(booted)
    new_key = "a-new-key-of-twenty-chars"
    result = await evcp("config", "set", "--config", config, "AuthorizationKey", new_key)
    assert result.code == 0, result
    assert new_key not in result.out + result.err
    every = await evcp("config", "get", "--config", config, "--json")
    assert "AuthorizationKey" not in every.json() and new_key not in every.out
    got = await evcp("config", "get", "--config", config, "AuthorizationKey")
    got.assert_clean_error(2, "AuthorizationKey")


async def test_tx_lists_transactions_with_energy_reason_and_delivery(
    booted: RunningAgent, csms: Csms
) -> None:
    config = config_of(booted)
    empty = await evcp("tx", "--config", config, "--json")
    assert (empty.code, empty.json()) == (0, []), empty
    assert "no transactions" in (await evcp("tx", "--config", config)).out

    csms_id = await start_charging(booted, csms, tag="TX-TAG")
    running = (await evcp("tx", "--config", config, "--json")).json()
    assert len(running) == 1 and running[0]["running"] is True
    assert running[0]["delivered"] is False and running[0]["meter_stop_wh"] is None

    # The simulated meter runs at the config's time scale: let some energy flow.
    await booted.wait_status(lambda s: (s["connectors"][0]["session_energy_wh"] or 0) > 0)
    mark = len(csms.received)
    await booted.sim("unplug")
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)

    async def delivered() -> list[dict[str, object]]:
        while True:
            result = await evcp("tx", "--config", config, "--json", "--last", "5")
            assert result.code == 0, result
            rows: list[dict[str, object]] = result.json()
            if rows and rows[0]["delivered"]:
                return rows
            await asyncio.sleep(0.1)

    rows = await asyncio.wait_for(delivered(), 30)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) >= TX_FIELDS
    stop = next(m for m in csms.received if m.action == "StopTransaction")
    start = next(m for m in csms.received if m.action == "StartTransaction")
    assert row["transaction_id"] == csms_id == stop.payload["transactionId"]
    assert row["connector_id"] == 1 and row["id_tag"] == "TX-TAG"
    assert row["meter_start_wh"] == start.payload["meterStart"]
    assert row["meter_stop_wh"] == stop.payload["meterStop"]
    assert row["reason"] == stop.payload.get("reason", "Local") == "EVDisconnected"
    assert row["delivered"] is True and row["running"] is False
    assert row["energy_wh"] == stop.payload["meterStop"] - start.payload["meterStart"] > 0

    table = await evcp("tx", "--config", config)
    line = table.out.splitlines()[1]
    assert line.split()[0] == str(csms_id)
    assert "TX-TAG" in line and "EVDisconnected" in line and "kWh" in line
    assert line.rstrip().endswith("yes")


async def test_tx_last_must_be_a_sensible_number(booted: RunningAgent) -> None:
    result = await evcp("tx", "--config", config_of(booted), "--last", "0")
    result.assert_clean_error(2, "--last")


async def test_field_commands_say_when_the_agent_is_not_running(
    tmp_path: Path, ca_file: Path
) -> None:
    config = str(offline_config(tmp_path / "cfg", ca_file))
    for args in (
        ["config", "get", "--json", "HeartbeatInterval"],
        ["config", "set", "HeartbeatInterval", "60"],
        ["tx", "--json"],
        ["tx"],
    ):
        result = await evcp(*args, "--config", config)
        result.assert_clean_error(1, "not running")
        assert result.out == ""


# ------------------------------------------------------------------------ evcp status


def table_row(out: str, connector: int) -> str:
    return next(line for line in out.splitlines() if line.split()[:1] == [str(connector)])


async def test_status_table_keeps_its_columns_and_says_why_a_connector_is_faulted(
    booted: RunningAgent,
) -> None:
    config = config_of(booted)
    plain = await evcp("status", "--config", config)
    header = plain.out.splitlines()[plain.out.splitlines().index("") + 1]
    await booted.sim("fault", code="GroundFailure")
    await booted.wait_status(lambda s: s["connectors"][0]["status"] == "Faulted")
    table = await evcp("status", "--config", config)
    assert table.code == 0, table
    lines = table.out.splitlines()
    header = lines[lines.index("") + 1]
    row = table_row(table.out, 1)
    assert "Faulted (GroundFailure)" in row
    # The columns stay under their headers, however long the status is.
    vehicle = (await booted.status())["connectors"][0]["vehicle"]
    assert row[header.index("vehicle") :].split()[0] == vehicle, (header, row)
    for column, unit in (("offered", "A"), ("power", "W"), ("meter", "kWh")):
        end = header.index(column) + len(column)
        assert row[end - len(unit) - 1 : end] == f" {unit}", (column, header, row)
    why = lines[lines.index(row) + 1]
    assert why.strip().startswith("why:") and "GroundFailure" in why

    await booted.sim("clear-fault")
    await booted.sim("meter-silent")
    await booted.wait_status(lambda s: s["connectors"][0]["status"] == "Faulted")
    table = await evcp("status", "--config", config)
    lines = table.out.splitlines()
    why = lines[lines.index(table_row(table.out, 1)) + 1]
    assert "meter does not answer" in why, table.out


async def test_status_table_shows_uptime_clock_heartbeat_and_session_energy(
    booted: RunningAgent, csms: Csms
) -> None:
    config = config_of(booted)
    interval = await evcp("config", "set", "--config", config, "HeartbeatInterval", "1")
    assert interval.code == 0, interval
    csms_id = await start_charging(booted, csms)
    status = await booted.wait_status(
        lambda s: (
            (s["connectors"][0]["session_energy_wh"] or 0) > 0
            and s["csms"]["last_heartbeat"] is not None
        )
    )
    table = await evcp("status", "--config", config)
    assert table.code == 0, table
    first = table.out.splitlines()[0]
    assert ", up " in first
    assert "last heartbeat " + status["csms"]["last_heartbeat"] in table.out
    clock = next(line for line in table.out.splitlines() if line.startswith("Clock "))
    # The test agent has no NTP servers: it trusts the system clock and says so.
    assert "system clock trusted" in clock and status["clock"]["ntp_servers"] == []
    row = table_row(table.out, 1)
    local = status["connectors"][0]["transaction_local_id"]
    assert f"{csms_id} (local {local})" in row
    # The session's own energy in its column, and the meter's register beside it.
    session_col = row.split(" W ")[1].split()
    assert session_col[1] == "kWh" and float(session_col[0]) > 0
    assert session_col[3] == "kWh" and float(session_col[0]) <= float(session_col[2])


# ------------------------------------------------------------------ another user's request


def as_nobody(*args: str) -> Result:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "agent", *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


async def test_config_set_by_another_user_is_refused_with_the_agents_word(
    csms: Csms, ca_file: Path
) -> None:
    """The agent decides who may change things (SO_PEERCRED): a member of the evcp group
    may read keys, only root (or the agent's user) may set them. The socket is opened to
    everyone here to stand in for the group; the user is nobody."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    if as_nobody("--version").code != 0:
        pytest.skip("this Python cannot be run by nobody here")
    base = Path(tempfile.mkdtemp(prefix="evcp-test-peer-"))
    agent = None
    try:
        base.chmod(0o755)
        shutil.copy(ca_file, base / "ca.pem")
        config = write_config(base, url=f"wss://localhost:{csms.port}/ocpp",
                              ca_file=base / "ca.pem")  # fmt: skip
        config.chmod(0o644)
        agent = await RunningAgent(config).start()
        agent.socket.chmod(0o666)
        got = await asyncio.to_thread(
            as_nobody, "config", "get", "--config", str(config), "--json", "HeartbeatInterval"
        )
        assert got.code == 0 and list(got.json()) == ["HeartbeatInterval"], got
        refused = await asyncio.to_thread(
            as_nobody, "config", "set", "--config", str(config), "HeartbeatInterval", "77"
        )
        refused.assert_clean_error(1, "only root may config-set")
        after = await evcp("config", "get", "--config", str(config), "--json", "HeartbeatInterval")
        assert after.json()["HeartbeatInterval"] != "77"
    finally:
        if agent is not None:
            await agent.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_status_while_the_agent_waits_for_the_clock_says_so(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    """No NTP server answers (port 9): the agent waits for the clock before its first TLS
    connection, and ``evcp status`` says that rather than "not running"."""
    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    text = config.read_text().replace("ntp_servers = []", 'ntp_servers = ["127.0.0.1:9"]')
    config.write_text(text.replace("[time]", "[time]\nsync_attempts = 50\ntimeout_s = 1"))
    agent = RunningAgent(config)
    task = asyncio.get_running_loop().create_task(agent.start())
    try:
        async with asyncio.timeout(30):
            while True:
                result = await evcp("status", "--config", str(config))
                if result.code == 0:
                    break
                assert "not running" in result.err, result
                await asyncio.sleep(0.1)
        first = result.out.splitlines()[0]
        assert "waiting for the clock" in first, result.out
        assert "Connectors: not yet known (waiting for the clock" in result.out
        as_json = (await evcp("status", "--config", str(config), "--json")).json()
        assert as_json["phase"].startswith("waiting for the clock")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await task
        await agent.stop()
