"""The local control socket: ``evcp status`` and ``evcp sim`` talk to the running agent.

A Unix stream socket (mode 0660, so the owner and the ``evcp`` group may use it); one JSON
request per line, one JSON answer per line: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Bad requests get an error answer; the agent carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("evcp.control")

MAX_REQUEST = 64 * 1024


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a request (the kernel's word: SO_PEERCRED)."""

    uid: int
    pid: int

    def may_change(self) -> bool:
        """Root, or the agent's own user, may change things; the ``evcp`` group only reads."""
        return self.uid in (0, os.getuid())


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent could not be reached or refused the request; the message says why."""


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path``; every request line is passed to ``handler``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer.get_extra_info("socket"))
        try:
            while line := await reader.readline():
                answer = await _answer(line, handler, peer)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path=str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o660)
    return server


def _peer(sock: Any) -> Peer:
    """The connecting process's credentials; nobody (uid -1) if they cannot be read."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except (OSError, AttributeError, struct.error):
        return Peer(uid=-1, pid=0)
    return Peer(uid=uid, pid=pid)


async def _answer(line: bytes, handler: Handler, peer: Peer) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": 'request must be an object with a "cmd"'}
    try:
        return await handler(request, peer)
    except Exception as exc:
        log.exception("control request %s failed", request.get("cmd"))
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def request(path: Path, payload: dict[str, Any], *, timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one request to the agent at ``path`` and return its answer (blocking).

    Raises ControlError with a message for a person when the agent is not running.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(
            f"the agent is not running (nothing listens on {path}); "
            "start it with: evcp run --config FILE"
        ) from None
    except PermissionError:
        raise ControlError(
            f"no permission to use {path}: run as root or as a member of the agent's group"
        ) from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach the agent at {path}: {exc.strerror or exc}") from None
    try:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(f"the agent did not answer within {timeout_s:.0f} s") from None
    except OSError as exc:
        raise ControlError(f"the control connection failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError("the agent closed the control connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError("the agent's answer is not JSON (is this an evcp socket?)") from None
    if not isinstance(answer, dict):
        raise ControlError("the agent's answer is not a JSON object")
    return answer
