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

The secrets kept are bounded, whatever a CSMS sends: the configured ones
(:func:`add_secret`: the password and proxy password from the configuration), the
AuthorizationKey in use and the one before it (:func:`set_authorization_key`), and the
value of the ChangeConfiguration(AuthorizationKey) being handled, before it is accepted or
refused (:func:`candidate_secret`: one slot, the next candidate replaces it).

A CSMS cannot forge or flood the log: every control character in a message (newline,
carriage return, ESC, the other C0 and C1 codes, DEL, U+2028/U+2029) and every lone
surrogate is escaped (:func:`safe`, applied to every record with the redaction), and
:class:`RepeatFilter` on our handler lets a few warnings or errors of one kind through per
minute, then one line saying how many more there were.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
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


#: The AuthorizationKey in use and the one before it (newest last).
_KEYS: list[str] = []
#: The ChangeConfiguration(AuthorizationKey) value being handled, accepted or not yet.
_CANDIDATE: list[str] = []


def add_secret(value: str) -> None:
    """Never let ``value`` appear in a log line from now on.

    For the secrets of the configuration (a handful, fixed at start): a value that can
    change at a CSMS's will goes through :func:`set_authorization_key` or
    :func:`candidate_secret`, which keep a bounded number.
    """
    install()
    if len(value) >= 4:
        _SECRETS.add(value)


def set_authorization_key(value: str) -> None:
    """``value`` is the AuthorizationKey in use: it and the previous one stay redacted."""
    install()
    if len(value) < 4 or (_KEYS and _KEYS[-1] == value):
        return
    _KEYS.append(value)
    del _KEYS[:-2]


def candidate_secret(value: str) -> None:
    """A ChangeConfiguration(AuthorizationKey) value about to be handled: redacted until
    the next candidate (if it is accepted, :func:`set_authorization_key` keeps it)."""
    install()
    _CANDIDATE[:] = [value] if len(value) >= 4 else []


def secrets() -> frozenset[str]:
    """Every value redacted now (bounded: see the module's docstring)."""
    return frozenset((*_SECRETS, *_KEYS, *_CANDIDATE))


#: Control characters, C1 codes, line and paragraph separators, lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u2028``...),
    so that text from outside cannot start a line of its own, forge a record or drive the
    terminal."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def redact(text: str) -> str:
    text = _FRAME_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}", text)
    text = _FRAME_KEY_VALUE_FIRST.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}{m.group(4)}", text
    )
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    for secret in sorted(secrets(), key=len, reverse=True):
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
    clean = safe(redact(message))
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


class RepeatFilter(logging.Filter):
    """At most ``burst`` warnings or errors of one kind per ``window_s`` seconds.

    A kind is the logger, the level and the message's format string (so "answering message
    %s with CALLERROR %s" is one kind whatever the CSMS sent). Past the burst, records of
    that kind are held back and counted; when the window ends (checked on every record,
    and by :meth:`flush`), one line reports them: ``<the last one> [repeated 312 times in
    60 s]``. At most ``max_kinds`` kinds are tracked (the oldest window is reported and
    forgotten first). Info and debug records pass untouched.
    """

    def __init__(
        self,
        *,
        burst: int = 5,
        window_s: float = 60.0,
        max_kinds: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.max_kinds, self.clock = burst, window_s, max_kinds, clock
        #: kind -> [window start, records seen in the window, the last held back]
        self._kinds: dict[tuple[str, int, str], list[Any]] = {}
        self._next_expiry = float("inf")
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_evcp_summary", False):
            return True
        now = self.clock()
        due: list[tuple[tuple[str, int, str], list[Any]]] = []
        with self._lock:
            if now >= self._next_expiry:
                due = self._expire(now)
            if record.levelno < logging.WARNING:
                passed = True
            else:
                kind = (record.name, record.levelno, str(record.msg))
                state = self._kinds.get(kind)
                if state is None:
                    if len(self._kinds) >= self.max_kinds:
                        oldest = next(iter(self._kinds))
                        due.append((oldest, self._kinds.pop(oldest)))
                    state = self._kinds[kind] = [now, 0, None]
                    self._next_expiry = min(self._next_expiry, now + self.window_s)
                state[1] += 1
                passed = state[1] <= self.burst
                if not passed:
                    state[2] = record
        for kind, state in due:
            self._report(kind, state)
        return passed

    def flush(self) -> None:
        """Report every kind held back now (at exit)."""
        with self._lock:
            due = list(self._kinds.items())
            self._kinds.clear()
            self._next_expiry = float("inf")
        for kind, state in due:
            self._report(kind, state)

    def _expire(self, now: float) -> list[tuple[tuple[str, int, str], list[Any]]]:
        due = [(k, s) for k, s in self._kinds.items() if now - s[0] >= self.window_s]
        for kind, _state in due:
            del self._kinds[kind]
        self._next_expiry = min(
            (s[0] + self.window_s for s in self._kinds.values()), default=float("inf")
        )
        return due

    def _report(self, kind: tuple[str, int, str], state: list[Any]) -> None:
        held = state[1] - self.burst
        last: logging.LogRecord | None = state[2]
        if held <= 0 or last is None:
            return
        logger = logging.getLogger(kind[0])
        logger.log(
            kind[1],
            "%s [repeated %d times in %d s]",
            last.getMessage(),
            held,
            round(self.window_s),
            extra={"_evcp_summary": True},
        )


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
    handler.addFilter(RepeatFilter())
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


# ---------------------------------------------------------------- journald fields
#: The journald fields a line about a connector or a transaction carries (with the journal
#: handler: ``journalctl EVCP_TRANSACTION=12``; ``evcp logs --tx`` matches them).
CONNECTOR_FIELD = "EVCP_CONNECTOR"
TRANSACTION_FIELD = "EVCP_TRANSACTION"  # the agent's own (local) transaction id
CSMS_TRANSACTION_FIELD = "EVCP_CSMS_TRANSACTION"  # the CSMS's transactionId, once known


def tx_fields(
    connector: int | None = None, local_id: int | None = None, csms_id: int | None = None
) -> dict[str, str]:
    """The journald fields of a line about ``connector`` and its transaction, for
    ``log.info(..., extra=tx_fields(...))``."""
    fields = {}
    if connector is not None:
        fields[CONNECTOR_FIELD] = str(connector)
    if local_id is not None:
        fields[TRANSACTION_FIELD] = str(local_id)
    if csms_id is not None:
        fields[CSMS_TRANSACTION_FIELD] = str(csms_id)
    return fields


def tx_name(local_id: int, csms_id: int | None) -> str:
    """A transaction as log lines name it: the CSMS's id (what the operator sees) and the
    local one (what the agent's store and ``evcp tx`` show): ``transaction 1001 (local 7)``,
    or ``transaction local 7`` while the CSMS has not given its id."""
    if csms_id is None:
        return f"transaction local {local_id}"
    return f"transaction {csms_id} (local {local_id})"
