"""The firmware service end to end against real servers, real files and the real helper
process: an update downloaded over HTTPS (trustme CA), deferred while a transaction runs,
handed to the installer, reported Installed by the new version after a restart; retries
then DownloadFailed; a restart mid-download that resumes with Range; retrieveDate; a
rolled-back install reported InstallationFailed by the old version; GetDiagnostics uploaded
by HTTPS PUT and FTP STOR.

The charge point is :class:`Port`, a small implementation of the service's ChargePointPort
(the OCPP adapter is not wired to this feature yet): it records the statuses in the order a
CSMS would receive them and lets the test start and end a "transaction".
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import sqlite3
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from agent.features.firmware.service import (
    BOOT_MARKER,
    INSTALL_REQUEST,
    INSTALL_RESULT,
    FirmwareService,
    Settings,
    read_state,
)
from tests.agent.features.firmware.servers import FileServer, ftp_server
from tests.conftest import server_context

PAYLOAD = os.urandom(2 * 1024 * 1024 + 5)
DEB = "/evcp_0.2.0_all.deb"


class Port:
    """The charge point as the firmware service sees it."""

    def __init__(self, version: str = "0.1.0") -> None:
        self.version = version
        self.sent: list[tuple[str, str]] = []
        self.blocked: list[bool] = []
        self.in_transaction = False
        self._waiting: list[Callable[[], None]] = []

    async def send_firmware_status(self, status: str, request_id: int | None = None) -> None:
        self.sent.append(("firmware", status))

    async def send_diagnostics_status(self, status: str) -> None:
        self.sent.append(("diagnostics", status))

    async def send_log_status(self, status: str, request_id: int | None) -> None:
        self.sent.append(("log", status))

    async def verify_firmware(self, path: Path, signature: str, signing_certificate: str) -> str:
        raise AssertionError("no signed update in these tests")

    def write_security_log(self, target: Path, oldest: float | None, latest: float | None) -> None:
        target.write_text("security log\n")

    def when_idle(self, callback: Callable[[], None]) -> None:
        if self.in_transaction:
            self._waiting.append(callback)
        else:
            callback()

    def end_transaction(self) -> None:
        self.in_transaction = False
        waiting, self._waiting = self._waiting, []
        for callback in waiting:
            callback()

    def block_charging(self, blocked: bool) -> None:
        self.blocked.append(blocked)

    def firmware_version(self) -> str:
        return self.version

    def status_summary(self) -> dict[str, Any]:
        return {"connectors": [{"id": 1, "status": "Available"}], "queue": {"pending": 4}}

    def firmware(self) -> list[str]:
        return [s for kind, s in self.sent if kind == "firmware"]

    def diagnostics(self) -> list[str]:
        return [s for kind, s in self.sent if kind == "diagnostics"]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def https(ca: trustme.CA) -> Any:
    with FileServer(server_context(ca)) as server:
        server.state.files[DEB] = PAYLOAD
        yield server


@pytest.fixture
def settings(tmp_path: Path, ca_file: Path) -> Settings:
    config = tmp_path / "evcp.toml"
    config.write_text(
        '[csms]\nurl = "wss://csms.example/ocpp"\ncharge_point_id = "CP-1"\n'
        'password = "0123456789abcdef-secret"\n[ocpp]\nAuthorizationKey = "00112233445566778899"\n'
    )
    db = tmp_path / "evcp.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x)")
    return Settings(
        spool_dir=tmp_path / "spool",
        config_path=config,
        state_db=db,
        charge_point_id="CP-1",
        ca_file=str(ca_file),
        default_retries=1,
        default_retry_interval_s=0,
        transfer_timeout_s=20,
    )


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    running: list[FirmwareService] = []

    async def make(port: Port, **changes: Any) -> FirmwareService:
        svc = FirmwareService(port, dataclasses.replace(settings, **changes))
        await svc.start()
        svc.on_boot_accepted()
        running.append(svc)
        return svc

    yield make
    for svc in running:
        await svc.stop()


async def test_update_deferred_by_a_transaction_then_installed_by_the_new_version(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port("0.1.0")
    port.in_transaction = True
    svc = await service(port)
    svc.update_firmware(https.url(DEB), retrieve_date=time.time() - 3600)
    await until(lambda: port.firmware() == ["Downloading", "Downloaded"], "Downloaded")
    assert (settings.spool_dir / "firmware.download").read_bytes() == PAYLOAD
    # a transaction runs: nothing is installed, charging is not blocked
    assert svc.firmware_status() == "Downloaded"
    assert not (settings.spool_dir / INSTALL_REQUEST).exists()
    assert port.blocked == []
    port.end_transaction()
    await until(lambda: port.firmware()[-1:] == ["Installing"], "Installing")
    assert port.blocked == [True]
    request = json.loads((settings.spool_dir / INSTALL_REQUEST).read_text())
    assert request["file"] == "firmware.download" and request["from_version"] == "0.1.0"
    marker = json.loads((settings.spool_dir / BOOT_MARKER).read_text())
    assert marker["version"] == "0.1.0"
    # the installer restarts the service: the new version boots and is Accepted
    await svc.stop()
    new_port = Port("0.2.0")
    new = await service(new_port)
    await until(lambda: new_port.firmware() == ["Installed"], "Installed")
    assert new_port.blocked == [True, False]  # blocked from boot until proven healthy
    assert json.loads((settings.spool_dir / BOOT_MARKER).read_text())["version"] == "0.2.0"
    assert new.firmware_status() == "Idle"
    state = read_state(settings.spool_dir)
    assert state.update is None and state.last_result == "Installed 0.2.0"
    assert not (settings.spool_dir / "firmware.download").exists()


async def test_a_rolled_back_install_is_reported_by_the_old_version(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port("0.1.0")
    svc = await service(port)
    svc.update_firmware(https.url(DEB), retrieve_date=0)
    await until(lambda: port.firmware()[-1:] == ["Installing"], "Installing")
    await svc.stop()
    # what evcp-installer writes after reinstalling the previous package
    (settings.spool_dir / INSTALL_RESULT).write_text(
        json.dumps({"status": "InstallationFailed", "reason": "rolled back: no BootNotification"})
    )
    old_port = Port("0.1.0")
    await service(old_port)
    await until(lambda: old_port.firmware() == ["InstallationFailed"], "InstallationFailed")
    assert old_port.blocked == [False]
    assert read_state(settings.spool_dir).last_result == (
        "InstallationFailed: rolled back: no BootNotification"
    )


async def test_a_missing_file_is_retried_then_download_failed(
    https: FileServer, service: Callable[..., Any]
) -> None:
    port = Port()
    svc = await service(port)
    svc.update_firmware(https.url("/gone.deb"), 0, retries=3, retry_interval_s=0.1)
    await until(lambda: port.firmware()[-1:] == ["DownloadFailed"], "DownloadFailed")
    assert port.firmware() == ["Downloading", "DownloadFailed"]
    assert [r["path"] for r in https.state.requests] == ["/gone.deb"] * 3
    assert svc.firmware_status() == "Idle"


async def test_a_restart_mid_download_resumes_from_the_partial_file(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port()
    svc = await service(port)
    half = len(PAYLOAD) // 2
    https.state.hold_after = half  # the first response stalls after half the file
    svc.update_firmware(https.url(DEB), 0)
    part = settings.spool_dir / "firmware.download.part"
    await until(lambda: part.exists() and part.stat().st_size == half, "half the file on disk")
    await svc.stop()  # the agent dies (the helper process is killed with it)
    https.state.release.set()
    assert read_state(settings.spool_dir).update is not None
    port2 = Port()
    await service(port2)
    await until(lambda: "Downloaded" in port2.firmware(), "Downloaded after the restart")
    assert port2.firmware()[0] == "Downloaded"
    assert (settings.spool_dir / "firmware.download").read_bytes() == PAYLOAD
    assert https.state.requests[-1]["range"] == f"bytes={half}-"
    assert port.firmware() == ["Downloading"]  # the first life said Downloading, once


async def test_retrieve_date_in_the_future_waits(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port()
    svc = await service(port)
    retrieve_at = time.time() + 1.5
    svc.update_firmware(https.url(DEB), retrieve_at)
    assert svc.firmware_status() == "Idle"
    assert read_state(settings.spool_dir).update is not None  # persisted while waiting
    await until(lambda: "Downloaded" in port.firmware(), "Downloaded")
    assert https.state.requests[0]["at"] >= retrieve_at  # no request before the date
    assert port.firmware() == ["Downloading", "Downloaded", "Installing"]


async def test_http_location_refused_without_allow_http(service: Callable[..., Any]) -> None:
    with FileServer() as plain:
        plain.state.files[DEB] = PAYLOAD
        port = Port()
        svc = await service(port)
        svc.update_firmware(plain.url(DEB), 0, retries=5, retry_interval_s=0)
        await until(lambda: port.firmware()[-1:] == ["DownloadFailed"], "DownloadFailed")
        assert plain.state.requests == []
        assert "allow_http" in (read_state(svc.spool).last_result or "")


def _bundle_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name.split("/", 1)[1]] = f.read()
        return out


async def test_get_diagnostics_uploads_a_redacted_bundle_by_put(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port()
    svc = await service(port)
    name = svc.get_diagnostics(https.url("/diag"), time.time() - 3600, time.time())
    assert name.startswith("diagnostics-CP-1-") and name.endswith(".tar.gz")
    assert svc.diagnostics_status() == "Uploading"
    await until(lambda: port.diagnostics() == ["Uploading", "Uploaded"], "Uploaded")
    (got,) = https.state.uploads
    assert got.method == "PUT" and got.path == f"/diag/{name}"
    members = _bundle_members(got.body)
    assert set(members) == {"journal.txt", "config.json", "status.json", "integrity.txt"}
    config = members["config.json"].decode()
    assert "0123456789abcdef-secret" not in config and "00112233445566778899" not in config
    assert json.loads(config)["config"]["csms"]["password"] == "<redacted>"
    assert json.loads(config)["config"]["csms"]["charge_point_id"] == "CP-1"
    assert json.loads(members["status.json"])["queue"] == {"pending": 4}
    assert members["integrity.txt"].decode().strip().endswith(": ok")
    assert members["journal.txt"]  # the journal, or a line saying why there is none
    assert not (settings.spool_dir / name).exists()  # the bundle is not kept
    assert svc.diagnostics_status() == "Idle"


async def test_get_diagnostics_by_ftp_stor_and_upload_failed_after_retries(
    tmp_path: Path, service: Callable[..., Any], settings: Settings
) -> None:
    home = tmp_path / "ftp"
    (home / "in").mkdir(parents=True)
    port = Port()
    svc = await service(port, allow_http=True)
    with ftp_server(home) as base:
        name = svc.get_diagnostics(f"{base}/in/")
        await until(lambda: port.diagnostics()[-1:] == ["Uploaded"], "Uploaded")
    assert tarfile.is_tarfile(home / "in" / name)
    # the server is gone now: two attempts, then UploadFailed
    svc.get_diagnostics(f"{base}/in/", retries=2, retry_interval_s=0.1)
    await until(lambda: port.diagnostics()[-1:] == ["UploadFailed"], "UploadFailed")
    assert port.diagnostics() == ["Uploading", "Uploaded", "Uploading", "UploadFailed"]


async def test_no_installer_fails_the_install_and_unblocks_charging(
    https: FileServer, service: Callable[..., Any], settings: Settings
) -> None:
    port = Port()
    svc = await service(port, pickup_timeout_s=1.0)
    svc.update_firmware(https.url(DEB), 0)
    await until(lambda: port.firmware()[-1:] == ["InstallationFailed"], "InstallationFailed")
    assert port.firmware() == ["Downloading", "Downloaded", "Installing", "InstallationFailed"]
    assert port.blocked == [True, False]
    assert not (settings.spool_dir / INSTALL_REQUEST).exists()
    assert "evcp-installer.path" in (read_state(settings.spool_dir).last_result or "")


def test_settings_from_the_config_file(tmp_path: Path, ca_file: Path) -> None:
    from agent.config import load

    path = tmp_path / "evcp.toml"
    path.write_text(
        '[csms]\nurl = "wss://csms.example.com/ocpp"\ncharge_point_id = "CP-9"\n'
        'password = "0123456789abcdef-test"\n[agent]\nstate_dir = "st"\n'
        'control_socket = "c.sock"\n[time]\nntp_servers = []\n[hardware]\ndriver = "sim"\n'
        f'[firmware]\nca_file = "{ca_file}"\nupload_method = "post"\nrollback_after_s = 90\n'
    )
    s = Settings.from_config(load(path))
    assert s.spool_dir == tmp_path / "st" / "firmware"
    assert s.state_db == tmp_path / "st" / "evcp.db"
    assert (s.charge_point_id, s.upload_method, s.rollback_after_s) == ("CP-9", "post", 90)
    assert s.ca_file == str(ca_file) and s.allow_http is False
