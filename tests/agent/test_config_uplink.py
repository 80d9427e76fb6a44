"""``[uplink]``: the links and the supervisor's settings, validated like every section.

Each refusal names the file and the key (the entry's number for a link), as a user editing
the file needs; without the section the agent keeps the OS's routing (``cfg.uplink is None``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load

BASE = """
[csms]
url = "wss://csms.example.com/ocpp"
charge_point_id = "CP-1"
password = "0123456789abcdef-test"

[time]
ntp_servers = []

[hardware]
driver = "sim"
"""

TWO_LINKS = """
[uplink]
backend = "route"
[[uplink.links]]
name = "wifi"
interface = "wifi0"
kind = "wifi"
priority = 1
[[uplink.links]]
name = "gsm"
interface = "gsm0"
kind = "gsm"
priority = 2
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "evcp.toml"
    path.write_text(BASE + extra)
    return path


def refused(tmp_path: Path, extra: str) -> str:
    path = write(tmp_path, extra)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path.resolve()}: "), message
    return message


def test_no_uplink_section_leaves_routing_alone(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).uplink is None


def test_the_documented_interface_loads_with_defaults(tmp_path: Path) -> None:
    up = load(write(tmp_path, TWO_LINKS)).uplink
    assert up is not None
    assert up.backend == "route"
    assert [(link.name, link.interface, link.kind, link.priority) for link in up.links] == [
        ("wifi", "wifi0", "wifi", 1),
        ("gsm", "gsm0", "gsm", 2),
    ]
    assert up.hold_s == 60
    assert up.probe_interval_s == 2
    assert up.failures_to_down == 3
    assert up.successes_to_up == 3
    assert up.gsm_probe_interval_s == 300
    assert up.probe_tls is False
    assert up.link("gsm").at_port == ""


def test_links_are_ordered_by_priority_whatever_the_file_order(tmp_path: Path) -> None:
    extra = TWO_LINKS.replace("priority = 1", "priority = 9")
    up = load(write(tmp_path, extra)).uplink
    assert up is not None
    assert [link.name for link in up.links] == ["gsm", "wifi"]


def test_the_shipped_example_config_documents_every_uplink_key() -> None:
    from agent.config import UPLINK_KEYS, UPLINK_LINK_KEYS

    text = (Path(__file__).resolve().parents[2] / "etc" / "evcp.toml").read_text()
    assert "[[uplink.links]]" in text
    for key in [*(k for k in UPLINK_KEYS if k != "links"), *UPLINK_LINK_KEYS]:
        assert f"{key} = " in text, key


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('kind = "gsm"', 'kind = "lte"'), "[[uplink.links]] #2 kind: must be one of"),
        (('name = "gsm"', 'name = "wifi"'), "[[uplink.links]] #2 name: 'wifi' is already used"),
        (("priority = 2", "priority = 1"), "[[uplink.links]] #2 priority: 1 is already used"),
        (('"gsm0"', '"wifi0"'), "[[uplink.links]] #2 interface: 'wifi0' is already used"),
        (('"gsm0"', '"a-very-long-interface"'), "[[uplink.links]] #2 interface: must be"),
        (("priority = 2", 'priority = "2"'), "[[uplink.links]] #2 priority: must be an integer"),
        (('backend = "route"', 'backend = "nm"'), "[uplink] backend: must be one of"),
        (('backend = "route"', "hold_s = 0"), "[uplink] hold_s: must be between"),
        (('backend = "route"', "probe_tls = 1"), "[uplink] probe_tls: must be true or false"),
        (('backend = "route"', "probe_timeout_s = 5"), "[uplink] probe_timeout_s: must be short"),
        (('backend = "route"', "colour = 1"), "[uplink] colour: unknown key"),
        (('name = "gsm"', 'name = "g s m"'), "[[uplink.links]] #2 name: must be"),
        (('kind = "wifi"', 'kind = "wifi"\nat_port = "/dev/ttyUSB2"'), "#1 at_port: only"),
        (('kind = "wifi"', 'kind = "wifi"\nmtu = 1500'), "[[uplink.links]] #1 mtu: unknown key"),
        (('interface = "wifi0"\n', ""), "[[uplink.links]] #1 interface: missing value"),
    ],
)
def test_bad_uplink_config_names_the_key(
    tmp_path: Path, change: tuple[str, str], needle: str
) -> None:
    old, new = change
    assert old in TWO_LINKS
    assert needle in refused(tmp_path, TWO_LINKS.replace(old, new, 1))


def test_an_uplink_section_without_links_is_refused(tmp_path: Path) -> None:
    assert "[uplink] links: missing value" in refused(tmp_path, '[uplink]\nbackend = "route"\n')
    assert "[uplink] links: needs at least one" in refused(tmp_path, "[uplink]\nlinks = []\n")


def test_a_link_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    assert "[[uplink.links]] #1: must be a table" in refused(tmp_path, '[uplink]\nlinks = ["x"]\n')
