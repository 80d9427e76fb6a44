"""The security log, the critical/non-critical split, the [security] config section and
the service's root-certificate rules, on real files."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load
from agent.core.security import CRITICAL, EventType
from agent.features.security import crypto
from agent.features.security.certs import CertStore, RootType
from agent.features.security.crypto import HelperCrypto, InProcessCrypto
from agent.features.security.events import SecurityEvents, SecurityLog
from agent.features.security.keys import KEYS
from agent.features.security.service import SecurityService, build
from tests.agent.security import pki
from tests.conftest import write_config

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Queue:
    """The durable queue's port, as the session implements it (here: a list)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def enqueue_durable(self, action: str, payload: dict[str, Any]) -> None:
        self.items.append((action, payload))


class Port(Queue):
    """The session port for rules that never reach the network (no call, no reconnect)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = datetime.now(UTC)

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError(f"no CALL expected ({action})")

    async def reconnect(self, profile: int) -> bool:
        raise AssertionError("no reconnect expected")

    def now(self) -> datetime:
        return self.clock


class Keys(dict[str, str]):
    def __init__(self, **values: str) -> None:
        super().__init__({spec.name: spec.default for spec in KEYS}, **values)

    def raw(self, name: str) -> str:
        return self[name]

    def set(self, key: str, value: str) -> None:
        self[key] = value


@pytest.fixture
def umask_0022() -> Any:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_event_is_logged_critical_ones_are_queued_durably(
    tmp_path: Path, umask_0022: Any
) -> None:
    log = SecurityLog(tmp_path / "security.log")
    queue = Queue()
    events = SecurityEvents(log, queue)
    for n, event in enumerate(EventType):
        events.raise_event(event, T0 + timedelta(seconds=n), f"info {n}")
    assert [e["type"] for e in log.entries()] == [e.value for e in EventType]
    assert (tmp_path / "security.log").stat().st_mode & 0o777 == 0o640
    assert [p["type"] for _, p in queue.items] == [e.value for e in EventType if e in CRITICAL]
    assert {a for a, _ in queue.items} == {"SecurityEventNotification"}
    pending = events.take_pending()
    assert [p["type"] for p in pending] == [e.value for e in EventType if e not in CRITICAL]
    assert pending[0]["techInfo"] == "info 1"
    assert pending[0]["timestamp"] == (T0 + timedelta(seconds=1)).isoformat()
    assert events.take_pending() == []


def test_every_notification_payload_passes_the_ocpp_schema(tmp_path: Path) -> None:
    from ocpp.exceptions import ProtocolError
    from ocpp.messages import Call, validate_payload

    queue = Queue()
    events = SecurityEvents(SecurityLog(tmp_path / "security.log"), queue)
    for event in EventType:
        events.raise_event(event, datetime.now(UTC), "details" if event.value < "I" else "")
    payloads = [p for _, p in queue.items] + events.take_pending()
    assert len(payloads) == len(EventType)
    for n, payload in enumerate(payloads):
        asyncio.run(validate_payload(Call(str(n), "SecurityEventNotification", payload), "1.6"))
    with pytest.raises(ProtocolError, match="'type' is a required"):  # it does check
        asyncio.run(validate_payload(Call("x", "SecurityEventNotification", {}), "1.6"))


def test_log_rotates_and_stays_bounded(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path / "security.log", max_bytes=2000, keep=2)
    for n in range(200):
        log.append("InvalidMessages", T0 + timedelta(seconds=n), f"message {n}")
    files = log.files()
    assert [p.name for p in files] == ["security.log.2", "security.log.1", "security.log"]
    assert all(p.stat().st_size <= 2000 for p in files)
    entries = list(log.entries())
    assert entries[-1]["techInfo"] == "message 199"  # newest kept, in order
    numbers = [int(e["techInfo"].split()[1]) for e in entries]
    assert numbers == sorted(numbers)
    assert numbers[0] > 0  # the oldest went


def test_get_log_export_with_a_time_window_and_clearing(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path / "security.log")
    queue = Queue()
    events = SecurityEvents(log, queue)
    for n in range(5):
        events.raise_event(EventType.INVALID_MESSAGES, T0 + timedelta(hours=n), f"bad {n}")
    out = tmp_path / "export.log"
    count = log.export(out, since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3))
    assert count == 3
    lines = out.read_text().splitlines()
    assert lines[0] == f"{(T0 + timedelta(hours=1)).isoformat()} InvalidMessages bad 1"
    events.clear_log(T0 + timedelta(hours=9))
    assert [e["type"] for e in log.entries()] == ["SecurityLogWasCleared"]
    assert queue.items[-1][1]["type"] == "SecurityLogWasCleared"  # critical


def test_tech_info_over_255_is_cut(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path / "security.log")
    events = SecurityEvents(log, Queue())
    events.raise_event(EventType.INVALID_MESSAGES, T0, "x" * 1000)
    (payload,) = events.take_pending()
    assert len(payload["techInfo"]) == 255


def _service(tmp_path: Path, **keys: str) -> tuple[SecurityService, Port, SecurityLog]:
    port = Port()
    log = SecurityLog(tmp_path / "security.log")
    service = SecurityService(
        store=CertStore(tmp_path),
        events=SecurityEvents(log, port),
        crypto=InProcessCrypto(),
        keys=Keys(**keys),
        port=port,
        charge_point_id="CP-1",
    )
    return service, port, log


async def test_additional_root_certificate_check(tmp_path: Path) -> None:
    service, _port, log = _service(tmp_path, AdditionalRootCertificateCheck="true")
    old = pki.make_ca("Old CSMS root")
    assert await service.install_certificate("CentralSystemRootCertificate", old.pem) == "Accepted"
    stranger = pki.make_ca("Unrelated root")
    assert (
        await service.install_certificate("CentralSystemRootCertificate", stranger.pem)
        == "Rejected"
    )
    assert [e["type"] for e in log.entries()] == ["InvalidCentralSystemCertificate"]
    successor = pki.make_ca("New CSMS root", issuer=old)  # signed by the old one
    assert (
        await service.install_certificate("CentralSystemRootCertificate", successor.pem)
        == "Accepted"
    )
    store = service.store
    assert [c.pem for c in store.roots(RootType.CSMS)] == [successor.pem]
    # Its hash data name the old root's key as the issuer key, as the whitepaper defines.
    (data,) = store.hash_data(RootType.CSMS)
    expected = crypto.certificate_info(successor.pem, old.pem)
    assert data["issuer_key_hash"] == expected["issuer_key_hash"]
    assert data["issuer_key_hash"] != crypto.certificate_info(successor.pem)["issuer_key_hash"]
    assert [c.pem for c in store.fallback_roots()] == [old.pem]
    bundle = store.csms_bundle.read_text()
    assert old.pem.strip() in bundle and successor.pem.strip() in bundle  # until a connect
    store.commit_roots()
    assert store.fallback_roots() == []
    assert old.pem.strip() not in store.csms_bundle.read_text()


async def test_install_refuses_leaf_expired_unknown_type_and_a_full_store(
    tmp_path: Path,
) -> None:
    service, port, _log = _service(tmp_path, CertificateStoreMaxLength="1")
    root = pki.make_ca()
    leaf = pki.pem(pki.issue(root, pki.new_key().public_key(), pki.x509.Name([])))
    assert await service.install_certificate("CentralSystemRootCertificate", leaf) == "Rejected"
    assert await service.install_certificate("V2GRootCertificate", root.pem) == "Rejected"
    assert await service.install_certificate("ManufacturerRootCertificate", "junk") == "Rejected"
    port.clock = datetime.now(UTC) + timedelta(days=4000)  # past the test root's end
    assert await service.install_certificate("ManufacturerRootCertificate", root.pem) == "Rejected"
    port.clock = datetime.now(UTC)
    assert await service.install_certificate("ManufacturerRootCertificate", root.pem) == "Accepted"
    other = pki.make_ca("Other")
    assert await service.install_certificate("ManufacturerRootCertificate", other.pem) == "Rejected"
    assert service.store.count() == 1


async def test_profile_change_rules_through_the_service(tmp_path: Path) -> None:
    service, _port, _log = _service(tmp_path)
    assert service.change_security_profile("1") == "Rejected"  # down
    assert service.change_security_profile("2") == "Accepted"  # unchanged, nothing to apply
    assert service.change_security_profile("three") == "Rejected"
    assert service.change_security_profile("3") == "Rejected"  # no root, no certificate
    assert await service.apply_security_profile() is False
    assert service.snapshot() == {"profile": 2, "cp_certificate_expires": None}


def test_security_config_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, url="wss://localhost:9/ocpp", ca_file=None)
    cfg = load(path)
    assert cfg.security == {
        "key_algorithm": "ec-p256",
        "profile_fallback_s": 60,
        "log_max_kib": 256,
        "log_files": 3,
        "crypto": "helper",
    }
    service = build(cfg, keys=Keys(), port=Port())
    assert isinstance(service.crypto, HelperCrypto)
    assert (cfg.state_dir / "certs").stat().st_mode & 0o777 == 0o700
    path.write_text(path.read_text() + '\n[security]\nkey_algorithm = "dsa"\n')
    with pytest.raises(ConfigError, match=r"\[security\] key_algorithm"):
        load(path)


async def test_get_log_security_log_file_and_signed_only_switch(tmp_path: Path) -> None:
    service, port, _log = _service(tmp_path)
    start = port.clock
    for n in range(4):
        service.events.raise_event(
            EventType.INVALID_MESSAGES, start + timedelta(minutes=n), f"frame {n}"
        )
    outdir = tmp_path / "upload"
    outdir.mkdir()
    path = service.security_log_file(outdir, oldest=start + timedelta(minutes=2))
    assert path.parent == outdir and path.name.startswith("CP-1-security-")
    assert [line.split()[-1] for line in path.read_text().splitlines()] == ["2", "3"]
    assert service.plain_update_allowed()
    service.keys.set("SignedFirmwareOnly", "true")  # type: ignore[attr-defined]
    assert not service.plain_update_allowed()


def test_the_helper_keeps_cryptography_out_of_the_agent_process(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from agent.features.security.crypto import HelperCrypto\n"
        "import agent.features.security.service\n"
        "key = HelperCrypto().run('generate_key', algorithm='ec-p256')\n"
        "assert 'PRIVATE KEY' in key\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
