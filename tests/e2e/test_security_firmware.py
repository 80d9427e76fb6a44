"""The security whitepaper's firmware-side messages end to end: GetLog (both log types) and
SignedUpdateFirmware, the test CSMS over WSS, a real HTTPS server on loopback with a trustme
CA, real keys and signatures (tests/agent/security/pki.py). The install itself is the
privileged installer's (tests/agent/features/firmware/test_installer.py, tests/package):
here a good update must reach the hand-over (install.request in the spool), a bad one never.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.agent.features.firmware.servers import FileServer
from tests.agent.features.firmware.test_installer import build_deb
from tests.agent.security import pki
from tests.conftest import CP_ID, AgentFactory, RunningAgent, server_context

PAST = "2020-01-01T00:00:00Z"


@pytest.fixture
def files(ca: trustme.CA) -> Iterator[FileServer]:
    with FileServer(server_context(ca)) as server:
        yield server


def log_statuses(csms: Csms) -> list[tuple[str, Any]]:
    return [(m["status"], m.get("requestId")) for m in csms.messages("LogStatusNotification")]


def signed_statuses(csms: Csms) -> list[tuple[str, Any]]:
    return [
        (m["status"], m.get("requestId")) for m in csms.messages("SignedFirmwareStatusNotification")
    ]


def events(csms: Csms) -> list[str]:
    return [m["type"] for m in csms.messages("SecurityEventNotification")]


async def poll(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for state the CSMS does not see (the file server's)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def spool(agent: RunningAgent) -> Path:
    return agent.config.parent / "state" / "firmware"


async def started(make_agent: AgentFactory, csms: Csms, ca_file: Path) -> RunningAgent:
    agent: RunningAgent = await make_agent(extra=f'[firmware]\nca_file = "{ca_file}"\n')
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    return agent


async def test_get_log_uploads_the_security_log_and_the_diagnostics_log(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path
) -> None:
    await started(make_agent, csms, ca_file)
    await csms.wait_for(lambda: "StartupOfTheDevice" in events(csms), timeout_s=15)

    answer = await csms.call(
        CP_ID,
        call.GetLog(
            log={"remoteLocation": files.url("/logs")}, log_type="SecurityLog", request_id=7
        ),
    )
    assert answer["status"] == "Accepted"
    name = answer["filename"]
    await csms.wait_for(lambda: ("Uploaded", 7) in log_statuses(csms), timeout_s=30)
    assert log_statuses(csms) == [("Uploading", 7), ("Uploaded", 7)]
    (upload,) = files.state.uploads
    assert upload.method == "PUT" and upload.path == f"/logs/{name}"
    assert "StartupOfTheDevice" in upload.body.decode()

    answer = await csms.call(
        CP_ID,
        call.GetLog(
            log={"remoteLocation": files.url("/logs"), "oldestTimestamp": PAST},
            log_type="DiagnosticsLog",
            request_id=8,
        ),
    )
    assert answer["status"] == "Accepted" and answer["filename"].endswith(".tar.gz")
    await csms.wait_for(lambda: ("Uploaded", 8) in log_statuses(csms), timeout_s=30)
    assert log_statuses(csms)[2:] == [("Uploading", 8), ("Uploaded", 8)]
    bundle_upload = files.state.uploads[1]
    assert bundle_upload.path == f"/logs/{answer['filename']}"
    with tarfile.open(fileobj=io.BytesIO(bundle_upload.body)) as bundle:
        names = [m.name for m in bundle.getmembers()]
    assert any(n.endswith("status.json") for n in names)

    # Nothing under way any more: a triggered LogStatusNotification says Idle.
    answer = await csms.call(
        CP_ID, call.ExtendedTriggerMessage(requested_message="LogStatusNotification")
    )
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: len(log_statuses(csms)) == 5)
    assert log_statuses(csms)[4] == ("Idle", None)
    assert csms.errors == []


async def test_get_log_statuses_for_a_refusal_and_a_retry_under_way(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path
) -> None:
    await started(make_agent, csms, ca_file)
    # A location the charger cannot use: NotSupportedOperation, no upload.
    answer = await csms.call(
        CP_ID,
        call.GetLog(
            log={"remoteLocation": "gopher://127.0.0.1/x"}, log_type="SecurityLog", request_id=1
        ),
    )
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: len(log_statuses(csms)) == 2, timeout_s=30)
    assert log_statuses(csms) == [("Uploading", 1), ("NotSupportedOperation", 1)]

    # The server refuses the upload (403): PermissionDenied at once, no retry.
    files.state.upload_status = 403
    await csms.call(
        CP_ID,
        call.GetLog(
            log={"remoteLocation": files.url("/logs")},
            log_type="SecurityLog",
            request_id=2,
            retries=3,
            retry_interval=1,
        ),
    )
    await csms.wait_for(lambda: len(log_statuses(csms)) == 4, timeout_s=30)
    assert log_statuses(csms)[2:] == [("Uploading", 2), ("PermissionDenied", 2)]
    assert len(files.state.uploads) == 1

    # A server error with retries left: the upload is still under way (waiting for the
    # next attempt), so the triggered status is Uploading with its requestId; a new
    # GetLog replaces it (AcceptedCanceled).
    files.state.upload_status = 500
    await csms.call(
        CP_ID,
        call.GetLog(
            log={"remoteLocation": files.url("/logs")},
            log_type="SecurityLog",
            request_id=3,
            retries=2,
            retry_interval=3600,
        ),
    )
    await poll(lambda: len(files.state.uploads) == 2)
    await csms.call(CP_ID, call.ExtendedTriggerMessage(requested_message="LogStatusNotification"))
    await csms.wait_for(lambda: len(log_statuses(csms)) == 6, timeout_s=15)
    assert log_statuses(csms)[4:] == [("Uploading", 3), ("Uploading", 3)]
    files.state.upload_status = 201
    answer = await csms.call(
        CP_ID,
        call.GetLog(log={"remoteLocation": files.url("/logs")}, log_type="SecurityLog",
                    request_id=4),
    )  # fmt: skip
    assert answer["status"] == "AcceptedCanceled"
    await csms.wait_for(lambda: ("Uploaded", 4) in log_statuses(csms), timeout_s=30)
    assert csms.errors == []


# --- SignedUpdateFirmware


def signing_certificate(root: pki.Ca, key: pki.Key) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Firmware Signer")])
    return pki.pem(pki.issue(root, key.public_key(), name, client=False))


async def install_manufacturer_root(csms: Csms, root: pki.Ca) -> None:
    answer = await csms.call(
        CP_ID,
        call.InstallCertificate(
            certificate_type="ManufacturerRootCertificate", certificate=root.pem
        ),
    )
    assert answer["status"] == "Accepted"


def firmware_file(files: FileServer, tmp_path: Path) -> tuple[Path, bytes]:
    """A real ``evcp`` Debian package (the agent checks a download is one)."""
    path = build_deb(tmp_path / "evcp.deb", "9.9.9")
    data = path.read_bytes()
    files.state.files["/evcp.deb"] = data
    return path, data


async def test_signed_update_with_a_good_signature_reaches_the_installer(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    agent = await started(make_agent, csms, ca_file)
    root = pki.make_ca("Test Manufacturer Root")
    await install_manufacturer_root(csms, root)
    key = pki.new_key()
    path, data = firmware_file(files, tmp_path)
    answer = await csms.call(
        CP_ID,
        call.SignedUpdateFirmware(
            request_id=42,
            firmware={
                "location": files.url("/evcp.deb"),
                "retrieveDateTime": PAST,
                "signingCertificate": signing_certificate(root, key),
                "signature": pki.sign_file(key, path),
            },
        ),
    )
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: ("Installing", 42) in signed_statuses(csms), timeout_s=30)
    assert signed_statuses(csms) == [
        ("Downloading", 42), ("Downloaded", 42), ("SignatureVerified", 42), ("Installing", 42),
    ]  # fmt: skip
    request = json.loads((spool(agent) / "install.request").read_text())
    assert (spool(agent) / request["file"]).read_bytes() == data
    assert csms.messages("FirmwareStatusNotification") == []  # the signed variant only
    assert csms.errors == []


async def test_signed_update_with_a_bad_signature_is_never_installed(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    agent = await started(make_agent, csms, ca_file)
    root = pki.make_ca("Test Manufacturer Root")
    await install_manufacturer_root(csms, root)
    key = pki.new_key()
    path, _ = firmware_file(files, tmp_path)
    forged = pki.sign_file(pki.new_key(), path)  # signed with a key the certificate is not for
    answer = await csms.call(
        CP_ID,
        call.SignedUpdateFirmware(
            request_id=5,
            firmware={
                "location": files.url("/evcp.deb"),
                "retrieveDateTime": PAST,
                "signingCertificate": signing_certificate(root, key),
                "signature": forged,
            },
        ),
    )
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: ("InvalidSignature", 5) in signed_statuses(csms), timeout_s=30)
    await csms.wait_for(lambda: "InvalidFirmwareSignature" in events(csms), timeout_s=15)
    assert signed_statuses(csms) == [("Downloading", 5), ("Downloaded", 5), ("InvalidSignature", 5)]
    assert not (spool(agent) / "install.request").exists()
    assert not (spool(agent) / "firmware.download").exists()  # the rejected file is gone
    status = await agent.control({"cmd": "status"})
    assert status["connectors"][0]["status"] == "Available"  # charging was never blocked
    assert csms.errors == []


async def test_signed_update_from_another_root_is_refused_before_any_download(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    agent = await started(make_agent, csms, ca_file)
    await install_manufacturer_root(csms, pki.make_ca("Test Manufacturer Root"))
    other = pki.make_ca("Someone Else's Root")
    key = pki.new_key()
    path, _ = firmware_file(files, tmp_path)
    answer = await csms.call(
        CP_ID,
        call.SignedUpdateFirmware(
            request_id=9,
            firmware={
                "location": files.url("/evcp.deb"),
                "retrieveDateTime": PAST,
                "signingCertificate": signing_certificate(other, key),
                "signature": pki.sign_file(key, path),
            },
        ),
    )
    assert answer["status"] == "InvalidCertificate"
    await csms.wait_for(lambda: "InvalidFirmwareSigningCertificate" in events(csms), timeout_s=15)
    assert files.state.requests == []  # nothing was downloaded
    assert signed_statuses(csms) == []
    assert not (spool(agent) / "install.request").exists()
    assert csms.errors == []
