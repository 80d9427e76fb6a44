"""``evcp run`` (how the unit starts the agent) reads its command line without argparse,
and means by it exactly what argparse would; every other command line goes to argparse."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [["run"], ["run", "--config", "/etc/evcp/other.toml"], ["run", "--config=/tmp/a b.toml"]],
)
def test_the_daemon_command_line_means_what_argparse_says(argv: list[str]) -> None:
    config = cli.run_config(argv)
    assert config is not None
    args = cli._parser().parse_args(argv)
    assert (args.command, args.config) == ("run", config)


@pytest.mark.parametrize(
    "argv",
    [
        [], ["status"], ["run", "--help"], ["run", "--config"], ["run", "--config", "-x"],
        ["run", "extra"], ["run", "--config", "a", "--config", "b"], ["run", "--config="],
        ["--version"], ["run", "--json"],
    ],
)  # fmt: skip
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert cli.run_config(argv) is None


def test_evcp_run_reports_a_bad_config_without_importing_argparse(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    code = f"""
        import sys
        from agent import cli
        print(cli.main(["run", "--config", {str(missing)!r}]), "argparse" in sys.modules)
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "config error" in done.stderr and str(missing) in done.stderr


def test_a_wrong_run_command_line_still_gets_argparse_s_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--config: expected one argument" in done.stderr
