"""``evcp uplink switch NAME`` and the uplink lines of ``evcp status``: ready for the
control socket and the CLI.

Wiring: the control handler answers ``{"cmd": "uplink-switch", "link": NAME | "auto"}`` with
:func:`handle_switch` (passing the peer's uid from :func:`peer_uid`, so that only root can
force a link), ``{"cmd": "status"}`` gains ``"uplink": supervisor.snapshot()`` (``None``
without ``[uplink]``), and ``evcp status`` prints :func:`status_lines`.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Protocol


class Switchable(Protocol):
    async def switch(self, name: str) -> dict[str, Any]: ...

    async def release(self) -> dict[str, Any]: ...


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


async def handle_switch(
    request: dict[str, Any], supervisor: Switchable | None, uid: int | None
) -> dict[str, Any]:
    """Force a link (field testing), or ``"auto"`` to give the choice back to the rules."""
    if supervisor is None:
        return {"ok": False, "error": "no [uplink] section in the config: nothing to switch"}
    if uid != 0:
        return {"ok": False, "error": "evcp uplink switch is for root only (field testing)"}
    name = request.get("link")
    if not isinstance(name, str) or not name:
        return {"ok": False, "error": 'give a link name, or "auto"'}
    try:
        snapshot = await (supervisor.release() if name == "auto" else supervisor.switch(name))
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "uplink": snapshot}


def status_lines(uplink: dict[str, Any] | None) -> list[str]:
    """The uplink part of ``evcp status`` (human form)."""
    if not uplink:
        return []
    active = uplink["active"] or "(none yet)"
    forced = " (forced)" if uplink.get("forced") else ""
    lines = [f"Uplink   {active}{forced} via the {uplink['backend']} back-end"]
    process = uplink.get("process")
    if process and not process.get("running"):
        lines.append(f"         {process.get('error') or 'the uplink process is not running'}")
    if uplink.get("backend_error"):
        lines.append(f"         back-end error: {uplink['backend_error']}")
    for link in uplink["links"]:
        mark = "*" if link["active"] else " "
        health = "healthy" if link["healthy"] else f"down: {link['reason']}"
        lines.append(f"       {mark} {link['name']:<8} {link['interface']:<10} {health}")
    last = uplink.get("last_switch")
    if last:
        lines.append(
            f"         last switch {last['at']}: {last['from'] or '-'} -> {last['to']}"
            f" ({last['reason']})"
        )
    if uplink.get("waiting_for_call"):
        lines.append("         moving back once the CALL in flight is answered")
    modem = uplink.get("modem")
    if modem:
        if modem.get("error"):
            lines.append(f"Modem    {modem['error']}")
        else:
            signal = "unknown" if modem.get("rssi_dbm") is None else f"{modem['rssi_dbm']} dBm"
            lines.append(
                f"Modem    {modem.get('registration') or 'unknown'}"
                f" {modem.get('operator') or ''}, signal {signal}".replace("  ", " ")
            )
    return lines
