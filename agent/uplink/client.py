"""The agent's end of the uplink process (``python -m agent.uplink --child``).

The uplink supervisor imports pyroute2, which costs about 12 MiB resident: it runs in a
child process so that the charging agent keeps its memory target. :class:`UplinkClient`
gives the agent what the supervisor used to give it in-process -- :meth:`snapshot` for
``evcp status``, :meth:`ping_interval_s` for the session, :meth:`identity` for
BootNotification, :meth:`switch` / :meth:`release` for ``evcp uplink switch`` -- and relays
the child's requests to the OCPP session (reconnect over the new link, the first choice of
a link) and the session's "a CALL awaits its answer" to the child. The protocol is in
:mod:`agent.uplink.child`.

This module imports nothing heavy (no pyroute2, no ``drivers.uplink``): keep it so.

The child is supervised: if it dies, one error line, and it is started again after a
back-off (1 s, doubling up to 60 s; reset once one has run for 60 s). Meanwhile the agent
runs over whatever route the OS has, and ``evcp status`` says the uplink process is down.
On the way out (:meth:`run` cancelled) the child gets SIGTERM, removes its route copy and
exits; SIGKILL if it has not after ``stop_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.config import Config, UplinkConfig

log = logging.getLogger("evcp.uplink")

#: While the child watches for CALLs (a move back is coming), the session is asked this often.
CALL_POLL_S = 0.05


class SessionPort(Protocol):
    """What the uplink needs from the OCPP session (as ``agent.uplink.supervisor``)."""

    def reconnect(self, reason: str) -> None: ...

    def call_in_flight(self) -> bool: ...

    def route_chosen(self) -> None: ...


def child_argv(config: Path) -> list[str]:
    """The command line of the uplink process."""
    return [sys.executable, "-m", "agent.uplink", "--child", "--config", str(config)]


class UplinkClient:
    """Runs and talks to the uplink process; one per agent, with ``[uplink]`` only."""

    def __init__(
        self,
        cfg: Config,
        *,
        argv: Sequence[str] | None = None,
        restart_min_s: float = 1.0,
        restart_max_s: float = 60.0,
        stable_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        request_timeout_s: float = 15.0,
    ) -> None:
        assert cfg.uplink is not None
        self.cfg: UplinkConfig = cfg.uplink
        self.argv = list(argv) if argv is not None else child_argv(cfg.path.absolute())
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        self.request_timeout_s = request_timeout_s
        self.session: SessionPort | None = None
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._snapshot: dict[str, Any] | None = None
        self._ready = asyncio.Event()
        self._down_reason = "the uplink process is starting"
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._watch = asyncio.Event()
        self._sent_in_flight: bool | None = None
        #: The link the previous child had chosen when it died (its route copy may remain).
        self._active_before: str | None = None

    # ------------------------------------------------------------------ what the agent uses

    def attach(self, session: SessionPort) -> None:
        self.session = session

    @property
    def pid(self) -> int | None:
        """The uplink process's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None and self._snapshot is not None

    @property
    def active(self) -> str | None:
        return self._snapshot.get("active") if self.running and self._snapshot else None

    def ping_interval_s(self, default: float | None) -> float | None:
        """The WebSocket ping interval for the link in use: ``gsm_ping_interval_s`` over gsm
        (None when it is 0: no pings), else ``default``."""
        active = self.active
        if active is not None and self.cfg.link(active).kind == "gsm":
            return self.cfg.gsm_ping_interval_s or None
        return default

    def snapshot(self) -> dict[str, Any]:
        """The ``"uplink"`` object of ``evcp status --json``: the child's, plus ``"process"``;
        while the child is down, every link unknown and the reason."""
        process = {
            "running": self.running,
            "pid": self.pid,
            "restarts": self.restarts,
            "error": None if self.running else self._down_reason,
        }
        if self.running and self._snapshot is not None:
            return {**self._snapshot, "process": process}
        why = self._down_reason
        modem = next((lk for lk in self.cfg.links if lk.at_port), None)
        return {
            "active": None,
            "backend": self.cfg.backend,
            "backend_error": None,
            "forced": None,
            "waiting_for_call": False,
            "last_switch": None,
            "links": [
                {
                    "name": link.name,
                    "interface": link.interface,
                    "kind": link.kind,
                    "priority": link.priority,
                    "healthy": False,
                    "active": False,
                    "state": "unknown",
                    "reason": why,
                    "carrier": False,
                    "addresses": [],
                    "last_probe": None,
                    "hold_s": self.cfg.hold_s,
                    "flaps": 0,
                }
                for link in self.cfg.links
            ],
            "modem": None if modem is None else {"link": modem.name, "error": why},
            "process": process,
        }

    async def identity(self, timeout_s: float = 5.0) -> tuple[str, str]:
        """``(iccid, imsi)`` from the modem ("" unknown); the child gets ``timeout_s`` to
        start and as long again to ask the modem. ValueError if it cannot answer."""
        if not any(link.at_port for link in self.cfg.links):
            return "", ""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        answer = await self._request(
            {"cmd": "identity", "timeout_s": timeout_s}, timeout_s=timeout_s + 2.0
        )
        iccid, imsi = answer.get("identity") or ("", "")
        return str(iccid or ""), str(imsi or "")

    async def switch(self, name: str) -> dict[str, Any]:
        """``evcp uplink switch NAME``: ValueError (the child's reason) if it cannot."""
        return await self._switch(name)

    async def release(self) -> dict[str, Any]:
        """``evcp uplink switch auto``."""
        return await self._switch("auto")

    async def _switch(self, name: str) -> dict[str, Any]:
        answer = await self._request(
            {"cmd": "switch", "link": name, "call_in_flight": self._in_flight()},
            timeout_s=self.request_timeout_s,
        )
        if "error" in answer:
            raise ValueError(str(answer["error"]))
        snap = answer.get("uplink")
        if isinstance(snap, dict):
            self._snapshot = snap
        return self.snapshot()

    # ------------------------------------------------------------------ the child's life

    async def run(self) -> None:
        """Run the uplink process until cancelled, starting it again when it dies."""
        loop = asyncio.get_running_loop()
        delay = self.restart_min_s
        while True:
            started = loop.time()
            why = await self._run_child()
            if loop.time() - started >= self.stable_s:
                delay = self.restart_min_s
            self._down_reason = f"the uplink process {why}; restarting it"
            log.error(
                "uplink: the uplink process %s; restarting it in %.0f s (the agent carries"
                " on over the routes as they are)",
                why,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_max_s)
            self.restarts += 1

    async def _run_child(self) -> str:
        """One life of the child; what ended it."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # where `agent` is importable from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # the agent's: the journal under systemd
                env=env,
                limit=1 << 20,
            )
        except OSError as exc:
            return f"cannot start ({exc})"
        self._proc = proc
        self._sent_in_flight = None
        calls = asyncio.create_task(self._relay_calls(proc), name="uplink-calls")
        try:
            assert proc.stdout is not None
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # longer than the limit: dropped
                    log.warning("uplink: ignoring an over-long line from the uplink process")
                    continue
                if not line:
                    break
                self._handle(line)
        finally:
            calls.cancel()
            self._gone()
            if proc.returncode is None:
                await asyncio.shield(self._stop(proc))
        code = await proc.wait()
        return (
            f"exited (code {code})" if code >= 0 else f"was killed ({signal.Signals(-code).name})"
        )

    def _gone(self) -> None:
        if self._snapshot is not None:
            self._active_before = self._snapshot.get("active")
        self._snapshot = None
        self._ready.clear()
        self._watch.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ValueError("the uplink process exited"))
        self._pending.clear()

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM (the child removes its route copy), then SIGKILL after the timeout."""
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            log.error("uplink: the uplink process did not stop in %g s: killed",
                      self.stop_timeout_s)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _handle(self, line: bytes) -> None:
        """One line from the child; a bad one is logged and ignored."""
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warning("uplink: ignoring a bad line from the uplink process: %.200r", line)
            return
        session = self.session
        if isinstance(message.get("snapshot"), dict):  # (also with a reconnect: the new link)
            self._snapshot = message["snapshot"]
            self._ready.set()
        if "snapshot" in message and len(message) == 1:
            pass
        elif "reconnect" in message:
            if session is not None:
                session.reconnect(str(message["reconnect"]))
        elif "route_chosen" in message:
            chosen, before = message["route_chosen"], self._active_before
            self._active_before = None
            if session is None:
                pass
            elif before is not None and isinstance(chosen, str) and chosen != before:
                session.reconnect(f"uplink process restarted: now on {chosen}")
            else:
                session.route_chosen()
        elif "watch_calls" in message:
            if message["watch_calls"]:
                self._sent_in_flight = None  # tell the child the current state at once
                self._watch.set()
            else:
                self._watch.clear()
        elif "reply" in message:
            future = self._pending.get(message["reply"])
            if future is not None and not future.done():
                future.set_result(message)
        else:
            log.warning("uplink: ignoring a bad line from the uplink process: %.200r", line)

    def _in_flight(self) -> bool:
        return self.session.call_in_flight() if self.session is not None else False

    def _send(self, message: dict[str, Any]) -> bool:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return False
        if proc.stdin.is_closing():
            return False
        proc.stdin.write((json.dumps(message) + "\n").encode())
        return True

    async def _relay_calls(self, proc: asyncio.subprocess.Process) -> None:
        """While the child watches (a move back is coming): "a CALL awaits its answer", on
        every change."""
        while True:
            await self._watch.wait()
            value = self._in_flight()
            if value != self._sent_in_flight and self._send({"call_in_flight": value}):
                self._sent_in_flight = value
            await asyncio.sleep(CALL_POLL_S)

    async def _request(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if not self.running:
            raise ValueError(self._down_reason)
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            if not self._send({"id": rid, **payload}):
                raise ValueError(self._down_reason)
            try:
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError:
                raise ValueError(f"the uplink process did not answer in {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
