"""Security events: the security log kept on the charger, and how each event reaches the CSMS.

Every event goes to the security log (``<state_dir>/security.log``: JSON lines, mode 0640,
rotated at ``max_bytes`` into ``security.log.1`` .. ``.<keep>``). Critical events (see
:data:`agent.core.security.CRITICAL`) are handed to the durable queue, like transaction
messages: they reach the CSMS even across a power cut. The others are kept in a bounded
in-memory list and sent once connected (best effort: lost on a restart, still in the log).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from agent.core.security import EventType, is_critical, tech_info

LOG_MODE = 0o640
ACTION = "SecurityEventNotification"


class DurableQueue(Protocol):
    """What the events need from the session: queue a CALL durably (as transaction
    messages are: stored before this returns, sent in order, retried until answered)."""

    def enqueue_durable(self, action: str, payload: dict[str, Any]) -> None: ...


class SecurityLog:
    """A bounded, rotated JSON-lines file: ``{"timestamp", "type", "techInfo"}`` a line."""

    def __init__(self, path: Path, *, max_bytes: int = 256 * 1024, keep: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    def files(self) -> list[Path]:
        """The log files, oldest first."""
        rotated = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.keep, 0, -1)]
        return [p for p in (*rotated, self.path) if p.exists()]

    def append(self, event: str, when: datetime, info: str) -> None:
        line = json.dumps({"timestamp": when.isoformat(), "type": event, "techInfo": info})
        data = (line + "\n").encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)
        try:
            os.fchmod(fd, LOG_MODE)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def entries(self) -> Iterator[dict[str, str]]:
        """Every entry, oldest first (damaged lines skipped)."""
        for path in self.files():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry

    def export(
        self, target: Path, *, since: datetime | None = None, until: datetime | None = None
    ) -> int:
        """Write the entries from ``since`` to ``until`` (inclusive, either open) to
        ``target`` as text for GetLog; return how many. A line:
        ``<timestamp> <type> <techInfo>``."""
        count = 0
        with open(target, "w") as out:
            for entry in self.entries():
                if since is not None or until is not None:
                    try:
                        when = datetime.fromisoformat(entry["timestamp"])
                    except (KeyError, ValueError):
                        continue
                    if (since is not None and when < since) or (until is not None and when > until):
                        continue
                text = f"{entry.get('timestamp', '')} {entry.get('type', '')}"
                out.write(f"{text} {entry.get('techInfo', '')}".rstrip() + "\n")
                count += 1
        return count

    def clear(self) -> None:
        for path in self.files():
            path.unlink()


class SecurityEvents:
    """Raise security events: log them, queue the critical ones durably."""

    def __init__(self, log: SecurityLog, queue: DurableQueue, *, pending_max: int = 50) -> None:
        self.log = log
        self.queue = queue
        self._pending: deque[dict[str, Any]] = deque(maxlen=pending_max)
        #: Sends a non-critical notification now if the CSMS can be reached (True: sent
        #: or on its way); when it cannot, the notification waits for the next connect.
        self.send_now: Callable[[dict[str, Any]], bool] = lambda payload: False

    def raise_event(self, event: EventType, when: datetime, info: str = "") -> None:
        info = tech_info(info)
        try:
            self.log.append(event.value, when, info)
        except OSError as exc:  # (a full disk: the notification still goes to the CSMS)
            logging.getLogger("evcp.security").warning(
                "security log %s not written (%s): %s", self.log.path, exc, event.value
            )
        payload: dict[str, Any] = {"type": event.value, "timestamp": when.isoformat()}
        if info:
            payload["techInfo"] = info
        if is_critical(event):
            self.queue.enqueue_durable(ACTION, payload)
        elif not self.send_now(payload):
            self._pending.append(payload)

    def take_pending(self) -> list[dict[str, Any]]:
        """The non-critical notifications not sent yet (send them once connected)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def clear_log(self, when: datetime) -> None:
        """Clear the log (e.g. on a factory reset): raises SecurityLogWasCleared."""
        self.log.clear()
        self.raise_event(EventType.SECURITY_LOG_WAS_CLEARED, when)
