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
