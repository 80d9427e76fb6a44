"""FailureLog: a failing device is logged once, reminded at a bounded rate, and its
recovery once -- instead of one error line per poll (8,640 a day at a 10 s poll)."""

from __future__ import annotations

import logging

import pytest

from agent.logs import FailureLog


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "evcp.test"]


def test_a_day_of_failed_polls_is_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="evcp.test")
    meter = FailureLog(logging.getLogger("evcp.test"), "connector 1: meter", remind_s=3600)
    written = [meter.failed(t * 10.0, "no answer from unit 1") for t in range(8640)]
    assert sum(written) == 1 + 23  # the failure, then one reminder an hour
    first, *reminders = lines(caplog)
    assert first == (logging.ERROR, "connector 1: meter failed: no answer from unit 1")
    assert reminders[0] == (
        logging.ERROR,
        "connector 1: meter still failing for 60 min (361 failed attempts): no answer from unit 1",
    )
    assert meter.failing


def test_recovery_is_logged_once_and_a_new_failure_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="evcp.test")
    log = FailureLog(logging.getLogger("evcp.test"), "controller", remind_s=600)
    assert not log.ok(0.0)  # healthy from the start: nothing to say
    log.failed(100.0, "timeout")
    log.failed(110.0, "timeout")
    assert log.ok(130.0)
    assert not log.ok(140.0)
    assert not log.failing
    log.failed(500.0, "timeout")
    assert lines(caplog) == [
        (logging.ERROR, "controller failed: timeout"),
        (logging.WARNING, "controller recovered after 30 s (2 failed attempts)"),
        (logging.ERROR, "controller failed: timeout"),
    ]


def test_a_changed_reason_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="evcp.test")
    log = FailureLog(logging.getLogger("evcp.test"), "meter", remind_s=600)
    log.failed(0.0, "no answer")
    assert log.failed(5.0, "Modbus exception 2 (illegal address)")
    assert not log.failed(10.0, "Modbus exception 2 (illegal address)")
    assert lines(caplog)[-1] == (
        logging.ERROR,
        "meter still failing, now: Modbus exception 2 (illegal address)",
    )


def test_journald_fields_ride_on_every_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="evcp.test")
    log = FailureLog(
        logging.getLogger("evcp.test"),
        "connector 2: meter",
        level=logging.WARNING,
        fields={"EVCP_CONNECTOR": "2", "EVCP_TRANSACTION": "17"},
    )
    log.failed(0.0, "no answer")
    log.ok(1.0)
    records = [r for r in caplog.records if r.name == "evcp.test"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert all(r.EVCP_CONNECTOR == "2" and r.EVCP_TRANSACTION == "17" for r in records)  # type: ignore[attr-defined]


def test_remind_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="remind_s"):
        FailureLog(logging.getLogger("evcp.test"), "x", remind_s=0)
