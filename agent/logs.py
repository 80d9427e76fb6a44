"""Logging: journald when running under systemd, stderr otherwise; secrets redacted.

The redaction filter sits on every handler, so no line can carry the AuthorizationKey or
the Basic Auth password, whoever logged it (evcp, the ``ocpp`` library, websockets): the
known secret values are replaced wherever they appear, and any ``AuthorizationKey`` value in
a logged OCPP frame is masked.
"""

from __future__ import annotations

import logging
import os
import re
import sys

REDACTED = "<redacted>"
_SECRETS: set[str] = set()
_FRAME_KEY = re.compile(r'("key"\s*:\s*"AuthorizationKey"\s*,\s*"value"\s*:\s*")((?:[^"\\]|\\.)*)"')


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line from now on."""
    if len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    text = _FRAME_KEY.sub(lambda m: m.group(1) + REDACTED + '"', text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup(level: str = "info", target: str = "auto") -> None:
    """Configure the root logger once (idempotent)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_evcp", False):
            root.removeHandler(old)
    handler: logging.Handler | None = None
    if target == "journal" or (target == "auto" and os.environ.get("JOURNAL_STREAM")):
        try:
            from systemd.journal import JournalHandler

            journal: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="evcp")
            journal.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            handler = journal
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler._evcp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Third-party chatter stays at warning unless we debug.
    for name in ("websockets", "pymodbus", "asyncio", "ocpp"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level == "debug" and name != "pymodbus" else logging.WARNING
        )
