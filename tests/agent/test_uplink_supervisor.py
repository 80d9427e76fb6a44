"""The supervisor's outside API without the network: what BootNotification gets from the
modem (ICCID, IMSI over a real pty to the simulated modem), the ping interval per link
kind, and the status shape before any probe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import ConfigError, UplinkConfig, load
from agent.uplink.supervisor import UplinkSupervisor
from drivers.sim.modem import SimModem
from tests.agent.test_config_uplink import BASE, TWO_LINKS

CONFIG = BASE + TWO_LINKS  # (the backend is "route" by default too)


def uplink_config(tmp_path: Path, extra: str = "") -> UplinkConfig:
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG + extra)
    cfg = load(path).uplink
    if cfg is None:
        raise ConfigError("no uplink")
    return cfg


@pytest.fixture
async def modem() -> AsyncIterator[SimModem]:
    sim = SimModem()
    await sim.start()
    yield sim
    await sim.stop()


async def test_boot_notification_gets_iccid_and_imsi_from_the_modem(
    tmp_path: Path, modem: SimModem
) -> None:
    sup = UplinkSupervisor(
        uplink_config(tmp_path, f'at_port = "{modem.path}"\n'), "csms.example.com", 443
    )
    assert await sup.identity() == ("89441000301234567890", "234150123456789")
    assert sup.snapshot()["modem"]["rssi_dbm"] == -73
    assert sup.snapshot()["modem"]["operator"] == "SimTel"


async def test_a_silent_modem_gives_empty_identity_and_says_why(
    tmp_path: Path, modem: SimModem
) -> None:
    modem.silent = True
    sup = UplinkSupervisor(
        uplink_config(tmp_path, f'at_port = "{modem.path}"\n'), "csms.example.com", 443
    )
    assert await sup.identity(timeout_s=10) == ("", "")
    assert sup.snapshot()["modem"]["iccid"] is None


async def test_no_modem_no_identity(tmp_path: Path) -> None:
    sup = UplinkSupervisor(uplink_config(tmp_path), "csms.example.com", 443)
    assert await sup.identity() == ("", "")
    assert sup.snapshot()["modem"] is None


async def test_status_before_any_probe_and_ping_interval_per_kind(tmp_path: Path) -> None:
    sup = UplinkSupervisor(uplink_config(tmp_path), "csms.example.com", 443)
    snap = sup.snapshot()
    assert snap["active"] is None
    assert [(lk["name"], lk["interface"], lk["healthy"], lk["active"]) for lk in snap["links"]] == [
        ("wifi", "wifi0", False, False),
        ("gsm", "gsm0", False, False),
    ]
    assert snap["last_switch"] is None
    assert sup.ping_interval_s(30) == 30
    sup.rules.observe_probe("gsm", True, 0)
    sup.rules.observe_presence("wifi", False, 0)
    assert sup.rules.decide(0) is not None
    assert sup.ping_interval_s(30) == 240  # gsm_ping_interval_s
    with pytest.raises(ValueError, match="'wifi' is not healthy"):
        await sup.switch("wifi")
