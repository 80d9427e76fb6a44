"""``evcp check-config``: a bad config file is refused with exit status 2 and one clear line.

These run the real command (``python -m agent check-config``) in a subprocess, as an
installer would, and check what the user sees: the exit status, the file and the key named
on stderr, and no Python traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import PLACEHOLDERS, load

ROOT = Path(__file__).resolve().parents[2]

VALID = """
[csms]
url = "wss://csms.example.com/ocpp"
charge_point_id = "CP-1"
password = "0123456789abcdef-test"

[agent]
state_dir = "state"
control_socket = "control.sock"

[time]
ntp_servers = []

[hardware]
driver = "sim"
connectors = 1
"""


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "evcp.toml"
    path.write_text(text)
    return path


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path.resolve()) in err or str(path) in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_valid_config_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_plain_ws_url_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("wss://", "ws://"))
    err = assert_refused(check_config(path), path, "[csms] url")
    assert "wss" in err


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("[hardware]\n", "[hardware]\nconnectorz = 2\n"))
    err = assert_refused(check_config(path), path, "[hardware] connectorz")
    assert "unknown key" in err


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "\n[csmss]\nurl = 1\n")
    assert_refused(check_config(path), path, "[csmss]", "unknown section")


def test_wrong_type_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("connectors = 1", 'connectors = "two"'))
    err = assert_refused(check_config(path), path, "[hardware] connectors")
    assert "integer" in err


def test_boolean_is_not_a_number(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("connectors = 1", "connectors = true"))
    assert_refused(check_config(path), path, "[hardware] connectors", "integer")


@pytest.mark.parametrize(
    ("remove", "key"),
    [
        ('password = "0123456789abcdef-test"\n', "[csms] password"),
        ('charge_point_id = "CP-1"\n', "[csms] charge_point_id"),
        ("ntp_servers = []\n", "[time] ntp_servers"),
    ],
)
def test_missing_required_key_is_refused(tmp_path: Path, remove: str, key: str) -> None:
    assert remove in VALID
    path = write(tmp_path, VALID.replace(remove, ""))
    err = assert_refused(check_config(path), path, key)
    assert "required" in err


def test_short_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("0123456789abcdef-test", "short-pw-xyz"))
    err = assert_refused(check_config(path), path, "[csms] password", "16 to 40")
    assert "short-pw-xyz" not in err


def test_password_of_wrong_type_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace('"0123456789abcdef-test"', "12345678901234567890"))
    err = assert_refused(check_config(path), path, "[csms] password", "string")
    assert "12345678901234567890" not in err


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert_refused(check_config(path), path, "no such config file")


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "\n[agent\n")
    assert_refused(check_config(path), path, "not valid TOML")


@pytest.mark.parametrize(
    "proxy",
    [
        "socks5://127.0.0.1:1080",
        "proxy.lan:3128",
        "http://",
        "http://proxy:99999",
        "http://proxy:0",
        "http://proxy:3128/path",
        "http://proxy:3128/?x=1",
        "http://user@proxy:3128",
    ],
)
def test_bad_proxy_url_is_refused(tmp_path: Path, proxy: str) -> None:
    text = VALID.replace('password = "', f'proxy = "{proxy}"\npassword = "')
    path = write(tmp_path, text)
    err = assert_refused(check_config(path), path, "[csms] proxy")
    assert "http" in err


def test_http_proxy_url_is_accepted(tmp_path: Path) -> None:
    text = VALID.replace('password = "', 'proxy = "http://proxy.lan:3128"\npassword = "')
    result = check_config(write(tmp_path, text))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("section_line", "extra", "key"),
    [
        ('driver = "sim"', '\n[sim]\nmeter_model = "sdm999"\n', "[sim] meter_model"),
        ('driver = "devices"', '\n[meter]\nmodel = "sdm999"\n', "[meter] model"),
    ],
)
def test_unknown_meter_model_is_refused(
    tmp_path: Path, section_line: str, extra: str, key: str
) -> None:
    text = VALID.replace('driver = "sim"', section_line) + extra
    path = write(tmp_path, text)
    err = assert_refused(check_config(path), path, key, "sdm999")
    assert "sdm630" in err  # the known models are listed


def test_broken_meter_map_file_is_refused_with_its_key(tmp_path: Path) -> None:
    (tmp_path / "mymeter.toml").write_text("[meter]\nname = 1\n")
    text = VALID + f'\n[sim]\nmeter_model = "{tmp_path / "mymeter.toml"}"\n'
    path = write(tmp_path, text)
    assert_refused(check_config(path), path, "[sim] meter_model", "mymeter.toml")


@pytest.mark.parametrize(
    "url",
    ["wss://[::1", "wss://csms.example.com:99999/ocpp", "wss://csms.example.com/ocpp?x=1"],
)
def test_a_url_that_can_never_work_is_refused(tmp_path: Path, url: str) -> None:
    text = VALID.replace('url = "wss://csms.example.com/ocpp"', f'url = "{url}"')
    path = write(tmp_path, text)
    assert_refused(check_config(path), path, "[csms] url")


def test_an_unparseable_proxy_url_is_refused(tmp_path: Path) -> None:
    text = VALID.replace('password = "', 'proxy = "http://[::1"\npassword = "')
    path = write(tmp_path, text)
    assert_refused(check_config(path), path, "[csms] proxy")


@pytest.mark.parametrize(
    ("transport", "port"),
    [("tcp", "70000"), ("tcp", "-1"), ("tcp", '"abc"'), ("rtu", "502"), ("rtu", '""')],
)
def test_a_meter_port_that_cannot_work_is_refused(
    tmp_path: Path, transport: str, port: str
) -> None:
    text = VALID.replace('driver = "sim"', 'driver = "devices"')
    text += f'\n[meter]\ntransport = "{transport}"\nport = {port}\n'
    path = write(tmp_path, text)
    assert_refused(check_config(path), path, "[meter] port")


def test_a_meter_tcp_port_written_as_a_string_is_accepted(tmp_path: Path) -> None:
    text = VALID.replace('driver = "sim"', 'driver = "devices"')
    text += '\n[meter]\ntransport = "tcp"\nport = "502"\n'
    result = check_config(write(tmp_path, text))
    assert result.returncode == 0, result.stderr


def test_a_control_socket_path_too_long_for_unix_is_refused(tmp_path: Path) -> None:
    long_path = "/tmp/" + "x" * 120 + "/control.sock"
    text = VALID.replace('control_socket = "control.sock"', f'control_socket = "{long_path}"')
    path = write(tmp_path, text)
    assert_refused(check_config(path), path, "[agent] control_socket")


@pytest.mark.parametrize(
    "line",
    [
        'ChargingScheduleAllowedChargingRateUnit = "Foo"',
        "ChargeProfileMaxStackLevel = -1",
        "MaxChargingProfilesInstalled = 0",
        'ConnectorPhaseRotation = "RST"',
    ],
)
def test_an_ocpp_key_value_that_would_break_a_profile_is_refused(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, VALID + f"\n[ocpp]\n{line}\n")
    assert_refused(check_config(path), path, "[ocpp] " + line.split(" = ")[0])


def test_a_meter_map_file_is_found_next_to_the_config_whatever_the_working_directory(
    tmp_path: Path,
) -> None:
    """A relative map path means the config file's folder (as state_dir does), not the
    directory the agent happens to start in (``/`` under systemd)."""
    maps = tmp_path / "maps"
    maps.mkdir()
    shipped = ROOT / "drivers" / "meter" / "models" / "sdm630.toml"
    (maps / "board-meter.toml").write_text(shipped.read_text())
    path = write(tmp_path, VALID + '\n[sim]\nmeter_model = "maps/board-meter.toml"\n')
    result = check_config(path)  # run from the repository, not from tmp_path
    assert result.returncode == 0, result.stderr
    assert load(path).sim["meter_model"] == str(maps / "board-meter.toml")
    (maps / "board-meter.toml").unlink()
    assert_refused(check_config(path), path, "[sim] meter_model", "board-meter.toml")


@pytest.mark.parametrize("tag", ["A" * 21, "HOME\\tTAB"])
def test_a_free_vend_id_tag_that_is_not_an_id_tag_is_refused(tmp_path: Path, tag: str) -> None:
    config = VALID.replace('control_socket = "control.sock"',
                           f'control_socket = "control.sock"\nfree_vend_id_tag = "{tag}"')  # fmt: skip
    path = write(tmp_path, config)
    assert_refused(check_config(path), path, "[agent] free_vend_id_tag", "CiString20")
    path = write(tmp_path, VALID.replace('control_socket = "control.sock"',
                                         'control_socket = "control.sock"\nfree_vend_id_tag = "HOME"'))  # fmt: skip
    assert check_config(path).returncode == 0


@pytest.mark.parametrize("value", ["5", "-1", "100000", '"300"'])
def test_a_queue_flush_interval_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    config = VALID.replace('control_socket = "control.sock"',
                           f'control_socket = "control.sock"\nqueue_flush_s = {value}')  # fmt: skip
    path = write(tmp_path, config)
    assert_refused(check_config(path), path, "[agent] queue_flush_s")


def test_a_relative_stage_dir_is_next_to_the_config(tmp_path: Path) -> None:
    config = VALID.replace('control_socket = "control.sock"',
                           'control_socket = "control.sock"\nqueue_flush_s = 300\n'
                           'stage_dir = "run"')  # fmt: skip
    path = write(tmp_path, config)
    assert check_config(path).returncode == 0
    loaded = load(path)
    assert loaded.agent["stage_dir"] == str(tmp_path / "run")
    assert loaded.agent["queue_flush_s"] == 300


@pytest.mark.parametrize("value", ["0", "10", "86400", "12.5"])
def test_queue_flush_values_in_range_are_accepted(tmp_path: Path, value: str) -> None:
    config = VALID.replace('control_socket = "control.sock"',
                           f'control_socket = "control.sock"\nqueue_flush_s = {value}')  # fmt: skip
    path = write(tmp_path, config)
    assert check_config(path).returncode == 0
    assert load(path).agent["queue_flush_s"] == float(value)


def test_meter_values_are_staged_in_run_for_10_s_by_default(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, VALID))
    assert loaded.agent["queue_flush_s"] == 10
    assert loaded.agent["stage_dir"] == "/run/evcp"


def test_the_shipped_example_config_is_valid_but_its_placeholders_are_refused() -> None:
    """Every key of the example is valid; only its CSMS identity and password are
    placeholders, which check-config (and run) refuse in one line naming all three."""
    example = load(ROOT / "etc" / "evcp.toml")
    assert example.agent["queue_flush_s"] == 10
    assert {key: example.csms[key] for key in PLACEHOLDERS} == PLACEHOLDERS
    result = check_config(ROOT / "etc" / "evcp.toml")
    assert_refused(result, ROOT / "etc" / "evcp.toml", "[csms] charge_point_id, password")


def test_one_placeholder_left_is_named(tmp_path: Path) -> None:
    text = VALID.replace('charge_point_id = "CP-1"', 'charge_point_id = "EVCP-000123"')
    assert text != VALID
    result = check_config(write(tmp_path, text))
    assert_refused(result, tmp_path / "evcp.toml", "[csms] charge_point_id: still the shipped")
