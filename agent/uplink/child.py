"""``python -m agent.uplink --child --config evcp.toml``: the uplink supervisor as a child
process of the agent (see :mod:`agent.uplink.client`, its other end).

The supervisor imports pyroute2 (about 12 MiB resident); in its own process that memory is
never the charging agent's. The two speak JSON, one object a line: the child writes to its
standard output, reads its standard input, and logs (logger ``evcp.uplink``) to its standard
error, which is the agent's (the journal under systemd).

Child -> agent:

* ``{"snapshot": {...}}``: the ``"uplink"`` object of ``evcp status --json``; sent when it
  changes and at least every ``SNAPSHOT_EVERY_S``;
* ``{"reconnect": REASON, "snapshot": {...}}``: the default route moved, reconnect over the
  new link now;
* ``{"route_chosen": LINK}``: the first choice of a link (not a reconnect);
* ``{"watch_calls": BOOL}``: a move back is coming: keep me told whether a CALL awaits its
  answer (the agent sends ``call_in_flight`` on every change while this is true);
* ``{"reply": ID, ...}``: the answer to a request (``"uplink"`` or ``"error"``, or
  ``"identity": [ICCID, IMSI]``).

Agent -> child:

* ``{"call_in_flight": BOOL}``;
* ``{"id": ID, "cmd": "switch", "link": NAME | "auto"}`` (``evcp uplink switch``);
* ``{"id": ID, "cmd": "identity", "timeout_s": SECONDS}`` (ICCID and IMSI for
  BootNotification).

The child stops (removing its route copy) on SIGTERM or when its standard input closes
(the agent is gone); it ignores SIGINT (Ctrl-C at a terminal: the agent stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from typing import Any
from urllib.parse import urlsplit

from agent.config import Config
from agent.uplink.supervisor import UplinkSupervisor

log = logging.getLogger("evcp.uplink")

#: The snapshot is sent at least this often, even when nothing changed.
SNAPSHOT_EVERY_S = 30.0


def send(message: dict[str, Any]) -> None:
    """One line to the agent (blocking: a few hundred bytes the agent always reads)."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    while data:
        written = os.write(sys.stdout.fileno(), data)
        data = data[written:]


class PipeSession:
    """The supervisor's :class:`~agent.uplink.supervisor.SessionPort`, over the pipe."""

    def __init__(self) -> None:
        self.in_flight = False
        self.supervisor: UplinkSupervisor | None = None

    def reconnect(self, reason: str) -> None:
        # with the state after the switch: the session's next connection asks the agent for
        # the ping interval of the new link at once
        sup = self.supervisor
        send({"reconnect": reason, **({"snapshot": sup.snapshot()} if sup is not None else {})})

    def call_in_flight(self) -> bool:
        return self.in_flight

    def route_chosen(self) -> None:
        sup = self.supervisor
        send({"route_chosen": sup.active if sup is not None else None})


async def serve(cfg: Config) -> int:
    """Run the supervisor for the agent until told to stop."""
    assert cfg.uplink is not None
    url = urlsplit(cfg.csms["url"])
    tls = ssl.create_default_context(cafile=cfg.csms["ca_file"] or None)
    session = PipeSession()
    last: list[str] = [""]
    watching = [False]
    sup: UplinkSupervisor

    def changed() -> None:
        snap = sup.snapshot()
        text = json.dumps(snap, sort_keys=True)
        if text != last[0]:
            last[0] = text
            send({"snapshot": snap})
        watch = sup.rules.next_move_back_at() is not None or sup.rules.waiting_for_call
        if watch != watching[0]:
            watching[0] = watch
            send({"watch_calls": watch})

    sup = UplinkSupervisor(
        cfg.uplink,
        url.hostname or "",
        url.port or 443,
        session=session,
        tls=tls,
        on_change=changed,
    )
    session.supervisor = sup
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(sup.run(), name="uplink")
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    # Ctrl-C at a terminal reaches the whole process group: the agent stops this process
    # itself (SIGTERM, or closing its standard input), after its own orderly stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    requests: set[asyncio.Task[None]] = set()

    async def answer(request: dict[str, Any]) -> None:
        rid = request.get("id")
        try:
            if request.get("cmd") == "identity":
                timeout = float(request.get("timeout_s", 5.0))
                send({"reply": rid, "identity": list(await sup.identity(timeout_s=timeout))})
                return
            if request.get("cmd") == "switch":
                name = request.get("link")
                if not isinstance(name, str) or not name:
                    raise ValueError('give a link name, or "auto"')
                snap = await (sup.release() if name == "auto" else sup.switch(name))
                send({"reply": rid, "uplink": snap})
                return
            raise ValueError(f"unknown request {request.get('cmd')!r}")
        except ValueError as exc:
            send({"reply": rid, "error": str(exc)})
        except Exception as exc:  # the agent gets an answer whatever happens
            log.error("uplink: request %r failed: %s: %s", request.get("cmd"),
                      type(exc).__name__, exc, exc_info=exc)  # fmt: skip
            send({"reply": rid, "error": f"{type(exc).__name__}: {exc}"})

    async def commands() -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                log.error("uplink: ignoring a bad line from the agent: %.200r", line)
                continue
            if "call_in_flight" in message:
                session.in_flight = bool(message["call_in_flight"])
            if "cmd" in message:
                task = asyncio.create_task(answer(message))
                requests.add(task)
                task.add_done_callback(requests.discard)
        runner.cancel()  # the agent is gone

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_S)
            send({"snapshot": sup.snapshot()})

    helpers = [asyncio.create_task(commands()), asyncio.create_task(heartbeat())]
    changed()  # the first snapshot at once: the agent's status has the links from now on
    code = 0
    try:
        await runner
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.error("uplink supervisor stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
        code = 1
    for task in [*helpers, *requests]:
        task.cancel()
    with contextlib.suppress(BrokenPipeError):
        await asyncio.gather(*helpers, *requests, return_exceptions=True)
    return code
