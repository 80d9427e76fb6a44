"""Without an ``[uplink]`` section the agent behaves as before: no ``"uplink"`` in the
status, nothing to switch, no modem identity in BootNotification.
(With one: tests/e2e/test_uplink_ocpp.py, in network namespaces.)"""

from __future__ import annotations

from agent.ocpp.csms import Csms
from tests.conftest import RunningAgent


async def test_without_an_uplink_section_nothing_changes(booted: RunningAgent, csms: Csms) -> None:
    status = await booted.status()
    assert "uplink" not in status
    answer = await booted.control({"cmd": "uplink-switch", "link": "gsm"})
    assert answer == {
        "ok": False,
        "error": "no [uplink] section in the config: nothing to switch",
    }
    boot = csms.messages("BootNotification")[0]
    assert "iccid" not in boot and "imsi" not in boot
