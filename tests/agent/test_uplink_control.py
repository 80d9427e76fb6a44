"""``evcp uplink switch`` as the control socket answers it: root only (the peer's uid read
with SO_PEERCRED over a real Unix socket), a clear error for an unknown or unhealthy link,
and the human status lines."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.config import load
from agent.uplink.control import handle_switch, peer_uid, status_lines
from agent.uplink.supervisor import UplinkSupervisor
from tests.agent.test_config_uplink import BASE, TWO_LINKS

CONFIG = BASE + TWO_LINKS  # (the backend is "route" by default too)


class NoBackend:
    """The route back-end would change this machine's routes: the test records instead."""

    name = "test"

    def __init__(self) -> None:
        self.applied: list[str] = []

    async def apply(self, interface: str) -> None:
        self.applied.append(interface)

    async def release(self) -> None:
        self.applied.append("released")


def supervisor(tmp_path: Path) -> tuple[UplinkSupervisor, NoBackend]:
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG)
    cfg = load(path).uplink
    assert cfg is not None
    backend = NoBackend()
    sup = UplinkSupervisor(cfg, "csms.example.com", 443, backend=backend, clock=lambda: 1000.0)
    for name in ("wifi", "gsm"):
        sup.rules.observe_probe(name, True, 0)
    sup.rules.decide(0)
    return sup, backend


def test_peer_uid_over_a_real_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.getuid()
    assert peer_uid(None) is None


async def test_only_root_may_force_a_link(tmp_path: Path) -> None:
    sup, backend = supervisor(tmp_path)
    answer = await handle_switch({"cmd": "uplink-switch", "link": "gsm"}, sup, uid=1000)
    assert answer == {"ok": False, "error": "evcp uplink switch is for root only (field testing)"}
    assert sup.active == "wifi" and backend.applied == []
    answer = await handle_switch({"cmd": "uplink-switch", "link": "gsm"}, sup, uid=0)
    assert answer["ok"] and answer["uplink"]["active"] == "gsm"
    assert answer["uplink"]["forced"] == "gsm"
    assert backend.applied == ["gsm0"]
    lines = status_lines(answer["uplink"])
    assert lines[0] == "Uplink   gsm (forced) via the test back-end"
    assert any("wifi -> gsm (forced by the operator)" in line for line in lines)
    answer = await handle_switch({"cmd": "uplink-switch", "link": "auto"}, sup, uid=0)
    assert answer["uplink"]["active"] == "wifi"  # the rules take over again
    assert backend.applied == ["gsm0", "wifi0"]


async def test_bad_switch_requests_are_clear_errors(tmp_path: Path) -> None:
    sup, _ = supervisor(tmp_path)
    answer = await handle_switch({"link": "lte"}, sup, uid=0)
    assert answer == {"ok": False, "error": "no link named 'lte' (links: wifi, gsm)"}
    assert (await handle_switch({}, sup, uid=0))["error"] == 'give a link name, or "auto"'
    answer = await handle_switch({"link": "gsm"}, None, uid=0)
    assert answer["error"].startswith("no [uplink] section")
    sup.rules.observe_presence("gsm", False, 1, "gsm0 has no carrier")
    answer = await handle_switch({"link": "gsm"}, sup, uid=0)
    assert answer == {"ok": False, "error": "link 'gsm' is not healthy (gsm0 has no carrier)"}
    assert status_lines(None) == []
