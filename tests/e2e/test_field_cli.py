"""What a field engineer types over SSH: output into a closed pipe, a second agent, --help,
usage errors, ``evcp selftest`` against the test CSMS and the simulated devices, ``evcp logs``.

Each command is a separate process (as a user runs it), in a thread while the agent runs in
the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.ocpp.csms import Csms
from tests.conftest import PASSWORD, AgentFactory, RunningAgent, write_config
from tests.e2e.test_cli import REPO, Result, evcp


def run_into_closed_pipe(*args: str) -> Result:
    """Run ``evcp ARGS`` with stdout a pipe whose reader is already gone (``| true``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    return Result(done.returncode, "", done.stderr)


def run_into_head(*args: str, lines: int = 1) -> tuple[Result, str]:
    """``evcp ARGS | head -LINES``: the reader leaves after its lines."""
    evcp_proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert evcp_proc.stdout is not None
    head = subprocess.run(
        ["head", f"-{lines}"], stdin=evcp_proc.stdout, capture_output=True, check=True
    )
    evcp_proc.stdout.close()
    _, err = evcp_proc.communicate(timeout=60)
    return Result(evcp_proc.returncode, "", err.decode()), head.stdout.decode()


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--json"], ["queue"], ["queue", "--json"], ["schedule"]],
)
async def test_output_into_a_closed_pipe_ends_quietly(
    booted: RunningAgent, args: list[str]
) -> None:
    result = await asyncio.to_thread(run_into_closed_pipe, *args, "--config", str(booted.config))
    assert result.code == 0, result
    assert result.err == "", result  # no BrokenPipeError traceback, no "Exception ignored"


async def test_schedule_into_head_prints_its_first_line_only(booted: RunningAgent) -> None:
    result, first = await asyncio.to_thread(
        run_into_head, "schedule", "--config", str(booted.config)
    )
    assert result.code == 0, result
    assert "Traceback" not in result.err and "BrokenPipe" not in result.err, result
    assert len(first.splitlines()) == 1 and first.strip()


async def test_a_second_agent_on_the_same_state_says_so_in_one_line(
    booted: RunningAgent,
) -> None:
    # The same config at the shipped log level (the test configs log at debug).
    second = booted.config.with_name("second.toml")
    second.write_text(
        booted.config.read_text().replace('log_level = "debug"', 'log_level = "info"')
    )
    result = await evcp("run", "--config", str(second))
    result.assert_clean_error(1, "in use by another process")
    assert not booted.task.done()  # type: ignore[union-attr]


async def test_help_shows_the_default_config_and_the_exit_statuses() -> None:
    top = await evcp("--help")
    assert top.code == 0
    for needle in ("exit status:", "2    a usage or configuration error", "selftest", "logs"):
        assert needle in top.out, top.out
    for command in ("run", "status", "check-config", "sim", "queue", "schedule", "probe",
                    "selftest", "tx", "config get", "config set"):  # fmt: skip
        result = await evcp(*command.split(), "--help")
        assert result.code == 0, result
        assert "default: /etc/evcp/evcp.toml" in " ".join(result.out.split()), result.out
        assert "exit status:" in result.out


def test_every_option_has_help_text() -> None:
    import argparse

    from agent.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not action.help
    ]
    assert missing == []


def test_the_man_page_is_made_from_the_parser() -> None:
    from agent.cli import _parser
    from agent.manpage import render

    page = render(_parser(), "2026-12-06")
    assert page.startswith('.TH EVCP 1 "2026-12-06"')
    for needle in (".SS evcp selftest", "\\-\\-offline", ".SH EXIT STATUS", "/etc/evcp/evcp.toml",
                   ".SS evcp config get", ".SS evcp tx"):  # fmt: skip
        assert needle in page
    done = subprocess.run(["man", "-l", "-"], input=page, capture_output=True, text=True)
    if done.returncode == 0:  # man-db installed: the page renders
        assert "evcp selftest" in done.stdout


async def test_usage_errors_exit_2(tmp_path: Path, ca_file: Path) -> None:
    config = str(write_config(tmp_path, url="wss://localhost:1/ocpp", ca_file=ca_file))
    result = await evcp("sim", "--config", config, "plug", "2")
    result.assert_clean_error(2, "connector 2", "1 connector(s)")
    result = await evcp("sim", "--config", config, "fault", "1", "Bogus")
    result.assert_clean_error(2, "Bogus", "GroundFailure", "EVCommunicationError", "pilot")
    result = await evcp("schedule", "--config", config, "--connector", "5")
    result.assert_clean_error(2, "connector 5", "0 to 1")
    result = await evcp("logs", "--tx", "abc")
    result.assert_clean_error(2, "--tx")


async def test_the_shipped_example_is_refused_with_what_to_set() -> None:
    result = await evcp("check-config", "--config", str(REPO / "etc" / "evcp.toml"))
    result.assert_clean_error(2, "[csms] charge_point_id, password", "example")
    result = await evcp("run", "--config", str(REPO / "etc" / "evcp.toml"))
    result.assert_clean_error(2, "[csms] charge_point_id, password", "example")


# ---------------------------------------------------------------------------- selftest


def checks_of(result: Result) -> dict[str, dict[str, Any]]:
    data = json.loads(result.out)
    assert set(data) == {"passed", "checks"}
    for check in data["checks"]:
        assert set(check) == {"name", "passed", "required", "detail"}
        assert isinstance(check["passed"], bool) and isinstance(check["required"], bool)
    return {c["name"]: c for c in data["checks"]}


async def test_selftest_against_the_csms_and_the_simulated_devices(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    result = await evcp("selftest", "--config", str(config), "--json")
    checks = checks_of(result)
    for name in ("clock", "dns", "csms-tls", "csms-auth", "meter", "controller", "disk",
                 "database"):  # fmt: skip
        assert checks[name]["passed"], checks[name]
        assert checks[name]["required"]
    assert "TLSv1.2" in checks["csms-tls"]["detail"]
    assert "ECDHE" in checks["csms-tls"]["detail"] or "AES" in checks["csms-tls"]["detail"]
    assert "accepted" in checks["csms-auth"]["detail"]
    assert " V" in checks["meter"]["detail"] and "Wh" in checks["meter"]["detail"]
    # The one check this machine may fail is the kernel's sync flag (a container's clock).
    failed = [name for name, c in checks.items() if c["required"] and not c["passed"]]
    assert failed in ([], ["clock-sync"]), checks
    assert result.code == (0 if not failed else 1)
    assert json.loads(result.out)["passed"] is (not failed)


async def test_selftest_says_when_the_csms_refuses_the_password(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    config = write_config(
        tmp_path,
        url=f"wss://localhost:{csms.port}/ocpp",
        ca_file=ca_file,
        password="wrong-password-0123456",
    )
    assert PASSWORD != "wrong-password-0123456"
    result = await evcp("selftest", "--config", str(config), "--json")
    checks = checks_of(result)
    assert result.code == 1
    assert not checks["csms-auth"]["passed"]
    assert "401" in checks["csms-auth"]["detail"]
    assert checks["csms-tls"]["passed"], checks["csms-tls"]
    assert "wrong-password" not in result.out


async def test_selftest_with_a_certificate_from_another_ca(tmp_path: Path, csms: Csms) -> None:
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=other)
    result = await evcp("selftest", "--config", str(config), "--json")
    checks = checks_of(result)
    assert result.code == 1
    assert not checks["csms-tls"]["passed"]
    assert "certificate" in checks["csms-tls"]["detail"]


async def test_selftest_offline_needs_no_csms_and_reads_a_running_agent(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    result = await evcp("selftest", "--config", str(agent.config), "--offline", "--json")
    checks = checks_of(result)
    for name in ("dns", "csms-tls", "csms-auth"):
        assert checks[name] == {"name": name, "passed": False, "required": False,
                                "detail": "skipped (--offline)"}  # fmt: skip
    assert checks["meter"]["passed"] and "running agent" in checks["meter"]["detail"]
    assert checks["database"]["passed"] and "running agent" in checks["database"]["detail"]
    assert result.code == 0, result
    table = await evcp("selftest", "--config", str(agent.config), "--offline")
    assert table.code == 0 and "selftest passed" in table.out
    assert "skip  dns" in table.out


async def test_selftest_offline_with_a_silent_meter_fails(tmp_path: Path, ca_file: Path) -> None:
    config = write_config(
        tmp_path, url="wss://localhost:1/ocpp", ca_file=ca_file,
        hardware_extra="", extra="",
    )  # fmt: skip
    # A devices config whose meter port does not exist: the meter check fails, clearly.
    text = config.read_text().replace('driver = "sim"', 'driver = "devices"')
    text += (
        '\n[meter]\ntransport = "rtu"\nport = "/dev/ttyNOPE0"\n\n[evse]\nport = "/dev/ttyNOPE1"\n'
    )
    config.write_text(text)
    result = await evcp("selftest", "--config", str(config), "--offline", "--json")
    checks = checks_of(result)
    assert result.code == 1
    assert not checks["meter"]["passed"] and "no answer" in checks["meter"]["detail"]
    assert not checks["controller"]["passed"] and "ttyNOPE1" in checks["controller"]["detail"]
    assert checks["disk"]["passed"] and checks["clock"]["passed"]


# -------------------------------------------------------------------------------- logs


async def test_logs_without_journalctl_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to run there
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "logs", "--since", "1h ago"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False,
    )  # fmt: skip
    Result(done.returncode, done.stdout, done.stderr).assert_clean_error(1, "journalctl")


def test_logs_asks_journalctl_for_the_unit_and_the_transaction() -> None:
    from agent.cli import UsageError, _parser, journalctl_command

    args = _parser().parse_args(["logs", "--tx", "42", "--since", "today", "--json", "-f"])
    cmd = journalctl_command(args)
    assert cmd[:3] == ["journalctl", "--unit", "evcp.service"]
    assert cmd[cmd.index("--since") + 1] == "today"
    assert "--follow" in cmd and cmd[cmd.index("--output") + 1] == "json"
    # Matched on the journal fields, not the text: the CSMS's id until its local id is
    # known (evcp logs looks it up), then the local id (every line of it carries that).
    assert cmd[-1] == "EVCP_CSMS_TRANSACTION=42" and "--grep" not in cmd
    assert journalctl_command(args, local_id=7)[-1] == "EVCP_TRANSACTION=7"
    local = _parser().parse_args(["logs", "--tx", "local:7", "--unit", ""])
    cmd = journalctl_command(local)
    assert cmd[-1] == "EVCP_TRANSACTION=7" and cmd[1:3] == ["--identifier", "evcp"]
    for bad in ("x", "local:", "csms:4", "-1"):
        with pytest.raises(UsageError):
            journalctl_command(_parser().parse_args(["logs", "--tx", bad]))
