"""Logging to journald through stderr (systemd's JOURNAL_STREAM), as without systemd-python.

Runs in a subprocess whose stderr is a pipe the test made, so that JOURNAL_STREAM can name
that very pipe, as systemd does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging
from agent import logs
logs.setup("info", "stderr")
logging.getLogger("evcp.session").warning("cannot connect\\nsecond line")
try:
    raise OSError("no space left")
except OSError:
    logging.getLogger("evcp.store").exception("disk full")
logging.getLogger("evcp").info("running")
"""


def run_with_stderr_pipe(journal_stream: str | None) -> list[str]:
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream.format(dev=st.st_dev, ino=st.st_ino)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stderr=write_end,
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert proc.returncode == 0, lines
    return lines


def test_stderr_read_by_journald_carries_syslog_priorities() -> None:
    lines = run_with_stderr_pipe("{dev}:{ino}")
    # A newline inside a message is escaped (text from outside cannot start a line of its
    # own); a traceback is several lines, each with the record's priority.
    assert lines[0] == "<4>evcp.session: cannot connect\\nsecond line"
    assert lines[1] == "<3>evcp.store: disk full"
    assert lines[2] == "<3>Traceback (most recent call last):"
    assert lines[-2] == "<3>OSError: no space left"
    assert all(line.startswith("<3>") for line in lines[1:-1])
    assert lines[-1] == "<6>evcp: running"


def test_stderr_of_a_terminal_or_file_keeps_timestamps() -> None:
    # JOURNAL_STREAM inherited from a parent whose stderr was something else.
    lines = run_with_stderr_pipe("1:2")
    assert len(lines) > 4
    assert not lines[0].startswith("<")
    assert " WARNING " in lines[0]
    assert lines[0].endswith("evcp.session: cannot connect\\nsecond line")
