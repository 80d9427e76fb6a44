"""Logging a CSMS cannot forge or flood, and a bounded redaction list (agent.logs).

Records go through a real ``logging`` handler writing to a text stream, with the filters
:func:`agent.logs.setup` installs; the rate limit's window runs on a clock the test
advances (time is an argument of the filter).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from agent import logs


@pytest.fixture(autouse=True)
def fresh_secrets() -> Iterator[None]:
    saved = (set(logs._SECRETS), list(logs._KEYS), list(logs._CANDIDATE))
    logs._SECRETS.clear()
    logs._KEYS.clear()
    logs._CANDIDATE.clear()
    yield
    logs._SECRETS.clear()
    logs._SECRETS.update(saved[0])
    logs._KEYS[:] = saved[1]
    logs._CANDIDATE[:] = saved[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def written() -> Iterator[tuple[io.StringIO, logs.RepeatFilter, Clock]]:
    """A handler like setup()'s (redaction, repeat limit) on a logger of its own."""
    logs.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    clock = Clock()
    repeat = logs.RepeatFilter(clock=clock)
    handler.addFilter(logs.RedactingFilter())
    handler.addFilter(repeat)
    logger = logging.getLogger("evcp.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield stream, repeat, clock
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


LOG = logging.getLogger("evcp.test_logs")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, été, 電", "plain text, été, 電"),
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),
        ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
        ("tab\there", "tab\\there"),
        ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
        ("lone\ud800", "lone\\ud800"),
    ],
)
def test_safe_escapes_every_control_character(text: str, shown: str) -> None:
    assert logs.safe(text) == shown
    assert logs.safe(shown) == shown  # what is already escaped stays as it is


def test_a_csms_cannot_forge_a_log_line(
    written: tuple[io.StringIO, logs.RepeatFilter, Clock],
) -> None:
    stream, _repeat, _clock = written
    key = "HeartbeatInterval\nERROR evcp.session: new AuthorizationKey accepted\x1b[0m"
    LOG.info("ChangeConfiguration %s refused", key)
    LOG.info(f"f-string too: {key}")
    assert lines(stream) == [
        "INFO evcp.test_logs: ChangeConfiguration HeartbeatInterval\\nERROR evcp.session:"
        " new AuthorizationKey accepted\\x1b[0m refused",
        "INFO evcp.test_logs: f-string too: HeartbeatInterval\\nERROR evcp.session:"
        " new AuthorizationKey accepted\\x1b[0m",
    ]
    # A lone surrogate no longer breaks the handler's encoding.
    LOG.warning("idTag %s", "\udcff")
    stream.getvalue().encode("utf-8")


def test_repeated_errors_are_counted_not_written(
    written: tuple[io.StringIO, logs.RepeatFilter, Clock],
) -> None:
    stream, repeat, clock = written
    for n in range(317):
        LOG.warning("answering message %s with CALLERROR %s", f"id-{n}", "FormationViolation")
        clock.now += 0.1  # 31.7 s in all
    LOG.error("a different error")
    LOG.info("info is never limited")
    LOG.info("info is never limited")
    assert len(lines(stream)) == repeat.burst + 3
    clock.now += 30  # the window is over: the next record reports the held-back ones
    LOG.debug("tick")
    out = lines(stream)
    assert out[-1] == "DEBUG evcp.test_logs: tick"
    assert out[-2] == (
        "WARNING evcp.test_logs: answering message id-316 with CALLERROR FormationViolation"
        " [repeated 312 times in 60 s]"
    )
    # A new window: the kind gets its burst again.
    LOG.warning("answering message %s with CALLERROR %s", "again", "FormationViolation")
    assert lines(stream)[-1].endswith("answering message again with CALLERROR FormationViolation")


def test_flush_reports_what_is_held_back_and_kinds_are_bounded(
    written: tuple[io.StringIO, logs.RepeatFilter, Clock],
) -> None:
    stream, repeat, _clock = written
    repeat.max_kinds = 3
    for kind in range(10):
        for _ in range(repeat.burst + 2):
            LOG.error(f"kind {kind}")
    assert len(repeat._kinds) <= 3
    repeat.flush()
    assert repeat._kinds == {}
    summaries = [line for line in lines(stream) if "[repeated 2 times in 60 s]" in line]
    assert len(summaries) == 10  # every kind reported once, evicted or flushed


def test_the_redaction_list_keeps_only_the_key_in_use_and_the_one_before(
    written: tuple[io.StringIO, logs.RepeatFilter, Clock],
) -> None:
    stream, _repeat, _clock = written
    logs.add_secret("configured-password")
    for n in range(20_000):
        logs.candidate_secret(f"refused-key-{n:08d}")  # ChangeConfiguration values, refused
    logs.set_authorization_key("first-key-0123456789")
    logs.set_authorization_key("second-key-0123456789")
    logs.set_authorization_key("third-key-0123456789")
    logs.candidate_secret("pending-key-0123456789")
    assert logs.secrets() == {
        "configured-password",
        "second-key-0123456789",
        "third-key-0123456789",
        "pending-key-0123456789",
    }
    LOG.warning(
        "%s %s %s %s %s",
        "configured-password",
        "first-key-0123456789",
        "second-key-0123456789",
        "third-key-0123456789",
        "pending-key-0123456789",
    )
    assert lines(stream)[-1] == (
        "WARNING evcp.test_logs: <redacted> first-key-0123456789 <redacted> <redacted> <redacted>"
    )
    # The next candidate replaces the last; setting the key in use again changes nothing.
    logs.candidate_secret("next-candidate-0123")
    logs.set_authorization_key("third-key-0123456789")
    assert "pending-key-0123456789" not in logs.secrets()
    assert "second-key-0123456789" in logs.secrets()
