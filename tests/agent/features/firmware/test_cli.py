"""``evcp firmware status``: read from the persisted state, with no agent running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent import __version__
from agent.core import firmware as fw
from agent.features.firmware.service import STATE_FILE

ROOT = Path(__file__).resolve().parents[4]


def config(tmp_path: Path) -> Path:
    path = tmp_path / "evcp.toml"
    path.write_text(
        '[csms]\nurl = "wss://csms.example.com/ocpp"\ncharge_point_id = "CP-1"\n'
        'password = "0123456789abcdef-test"\n[agent]\nstate_dir = "state"\n'
        'control_socket = "control.sock"\n[time]\nntp_servers = []\n'
        '[hardware]\ndriver = "sim"\n'
    )
    return path


def evcp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_with_nothing_ever_done(tmp_path: Path) -> None:
    done = evcp("firmware", "status", "--config", str(config(tmp_path)), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "version": __version__,
        "status": "Idle",
        "pending": None,
        "last_result": None,
    }


def test_status_shows_a_pending_download_and_the_last_result(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    spool = tmp_path / "state" / "firmware"
    spool.mkdir(parents=True)
    update = fw.Update(
        state=fw.FwState.RETRY_WAIT,
        location="https://fw.example/evcp.deb",
        retrieve_at=0,
        attempts=3,
        retry_interval_s=60,
        attempt=1,
        next_at=1e10,
        last_error="HTTP 503 Service Unavailable",
    )
    (spool / STATE_FILE).write_text(
        json.dumps({"update": update.to_json(), "upload": None, "last_result": "Installed 0.0.9"})
    )
    done = evcp("firmware", "status", "--config", str(cfg), "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "Downloading"
    assert view["pending"]["location"] == "https://fw.example/evcp.deb"
    assert view["pending"]["attempt"] == 1
    assert view["last_result"] == "Installed 0.0.9"
    text = evcp("firmware", "status", "--config", str(cfg))
    assert "HTTP 503" in text.stdout and "attempt 1 of 3" in text.stdout
    assert "Installed 0.0.9" in text.stdout


def test_a_bad_config_is_a_config_error(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text() + '[firmware]\nupload_method = "ftp"\n')
    done = evcp("firmware", "status", "--config", str(cfg), "--json")
    assert done.returncode == 2
    assert "[firmware] upload_method" in done.stderr and "Traceback" not in done.stderr


def test_firmware_config_keys_are_checked(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    base = cfg.read_text()
    for extra, needle in [
        ('[firmware]\nca_file = "missing.pem"\n', "[firmware] ca_file"),
        ('[firmware]\ninstall_command = "rauc install"\n', "{file}"),
        ("[firmware]\nrollback_after_s = 1\n", "[firmware] rollback_after_s"),
        ('[firmware]\nallow_http = "yes"\n', "[firmware] allow_http"),
    ]:
        cfg.write_text(base + extra)
        done = evcp("check-config", "--config", str(cfg))
        assert done.returncode == 2, extra
        assert needle in done.stderr, (extra, done.stderr)
    cfg.write_text(
        base + '[firmware]\ninstall_command = "rauc install {file}"\nallow_http = true\n'
    )
    assert evcp("check-config", "--config", str(cfg)).returncode == 0


def test_the_example_config_documents_every_firmware_key() -> None:
    from agent.config import SCHEMA

    text = (ROOT / "etc" / "evcp.toml").read_text()
    section = text.split("[firmware]", 1)[1].split("\n[", 1)[0]
    for key in SCHEMA["firmware"]:
        assert f"\n{key} = " in section, key
