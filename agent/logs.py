"""Logging: journald when running under systemd, stderr otherwise; secrets redacted.

No log record can carry the AuthorizationKey or the Basic Auth password, whoever logged it
(evcp, the ``ocpp`` library, websockets) and whichever handler writes it: records are
cleaned when they are created (a LogRecord factory, installed by :func:`add_secret` and
:func:`setup`), and again by a filter on our handler. Cleaning replaces the known secret
values wherever they appear, masks any ``AuthorizationKey`` value in a logged OCPP frame
(also one the agent refused, so never registered as a secret), masks ``Authorization:``
header values (websockets logs request headers at debug level), and reduces the data
frames websockets logs at debug level to their size: it shows only their first and last
bytes, so a key could leak in part, and evcp logs every frame itself, redacted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

REDACTED = "<redacted>"
_SECRETS: set[str] = set()
_KEY = r"""['"]?key['"]?\s*[:=]\s*['"]AuthorizationKey['"]"""
_VALUE = r"""['"]?value['"]?\s*[:=]\s*"""
_QUOTED = r"""(['"])((?:\\.|(?!\2).)*)\2"""
#: ``"key": "AuthorizationKey", "value": "..."`` (JSON, a dict repr or keyword arguments).
_FRAME_KEY = re.compile(rf"({_KEY}\s*,\s*{_VALUE}){_QUOTED}")
#: The same, value first: ``{"value": "...", "key": "AuthorizationKey"}``.
_FRAME_KEY_VALUE_FIRST = re.compile(rf"({_VALUE}){_QUOTED}(\s*,\s*{_KEY})")
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization\s*:\s*)(?:[A-Za-z]+\s+)?\S+")


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line from now on."""
    install()
    if len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    text = _FRAME_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}", text)
    text = _FRAME_KEY_VALUE_FIRST.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}{m.group(4)}", text
    )
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _summarise_frames(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """websockets data frames -> ``TEXT [n bytes]`` (control frames are kept as they are)."""
    try:
        from websockets.frames import DATA_OPCODES, Frame
    except ImportError:  # pragma: no cover - websockets is a dependency
        return args
    return tuple(
        f"{arg.opcode.name} [{len(arg.data)} bytes]"
        if isinstance(arg, Frame) and arg.opcode in DATA_OPCODES
        else arg
        for arg in args
    )


def clean_record(record: logging.LogRecord) -> None:
    """Redact ``record`` in place: its message, exception text and stack."""
    try:
        if isinstance(record.args, tuple) and record.args:
            record.args = _summarise_frames(record.args)
        message = record.getMessage()
    except Exception:
        return  # a bad format string: logging reports it when the record is emitted
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        clean = redact(record.exc_text)
        if clean != record.exc_text:
            # The raw exception must not reach a handler that formats it again.
            record.exc_text, record.exc_info = clean, None
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_installed = False


def install() -> None:
    """Clean every log record at creation, whatever handler later writes it (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        clean_record(record)
        return record

    logging.setLogRecordFactory(factory)


class RedactingFilter(logging.Filter):
    """The second line: cleans records created before :func:`install` or by a foreign
    record factory."""

    def filter(self, record: logging.LogRecord) -> bool:
        clean_record(record)
        return True


#: logging level -> syslog priority (sd-daemon(3) "<N>" line prefixes).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalStreamFormatter(logging.Formatter):
    """For stderr read by journald (JOURNAL_STREAM): each line starts with the record's
    syslog priority as ``<N>`` -- journald stores it as PRIORITY, so ``journalctl -p err``
    works without systemd-python -- and carries no timestamp (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for lvl, p in _PRIORITIES if record.levelno >= lvl), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to journald (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(level: str = "info", target: str = "auto") -> None:
    """Configure the root logger once (idempotent)."""
    install()
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_evcp", False):
            root.removeHandler(old)
    handler: logging.Handler | None = None
    if target == "journal" or (target == "auto" and stderr_is_journal()):
        try:
            from systemd.journal import JournalHandler

            journal: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="evcp")
            journal.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            handler = journal
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():  # no systemd-python, or log_target = "stderr" under systemd
            handler.setFormatter(JournalStreamFormatter())
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
    handler.addFilter(RedactingFilter())
    handler._evcp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Third-party chatter stays at warning unless we debug.
    for name in ("websockets", "pymodbus", "asyncio", "ocpp"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level == "debug" and name != "pymodbus" else logging.WARNING
        )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


class FailureLog:
    """Log a failing device or link once when it fails, a reminder at most every
    ``remind_s`` while it stays failed, and once when it recovers -- not on every poll.

    Time is an argument (seconds, monotonic): call :meth:`failed` on every failed attempt
    and :meth:`ok` on every good one. ``fields`` are journald fields (upper case, e.g.
    ``{"EVCP_CONNECTOR": "1"}``) added to every line; with the journal handler
    (systemd-python) they are searchable with ``journalctl EVCP_CONNECTOR=1``::

        meter_log = FailureLog(log, "connector 1: meter", fields={"EVCP_CONNECTOR": "1"})
        ...
        try:
            reading = await meter.read()
        except DriverError as exc:
            meter_log.failed(time.monotonic(), str(exc))
        else:
            meter_log.ok(time.monotonic())

    A different reason while failing is logged at once (the fault changed), then reminded
    as before. Each method returns whether it wrote a line.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        remind_s: float = 600.0,
        level: int = logging.ERROR,
        fields: dict[str, str] | None = None,
    ) -> None:
        if remind_s <= 0:
            raise ValueError("remind_s must be positive")
        self.logger, self.what, self.remind_s, self.level = logger, what, remind_s, level
        self.fields = dict(fields or {})
        self._since: float | None = None  # when the failure began
        self._last_logged = 0.0
        self._reason = ""
        self._count = 0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, now: float, reason: str) -> bool:
        if self._since is None:
            self._since, self._count, self._reason = now, 1, reason
            return self._emit(now, self.level, "%s failed: %s", self.what, reason)
        self._count += 1
        if reason != self._reason:
            self._reason = reason
            return self._emit(now, self.level, "%s still failing, now: %s", self.what, reason)
        if now - self._last_logged >= self.remind_s:
            return self._emit(
                now,
                self.level,
                "%s still failing for %s (%d failed attempts): %s",
                self.what,
                _duration(now - self._since),
                self._count,
                reason,
            )
        return False

    def ok(self, now: float) -> bool:
        if self._since is None:
            return False
        since, count = self._since, self._count
        self._since, self._count, self._reason = None, 0, ""
        return self._emit(
            now,
            logging.WARNING if self.level >= logging.WARNING else self.level,
            "%s recovered after %s (%d failed attempts)",
            self.what,
            _duration(now - since),
            count,
        )

    def _emit(self, now: float, level: int, message: str, *args: Any) -> bool:
        self._last_logged = now
        self.logger.log(level, message, *args, extra=self.fields or None)
        return True
