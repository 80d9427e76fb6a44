"""Firmware Management end to end: the test CSMS asks over WSS, the agent fetches from (or
uploads to) a real HTTPS server on loopback, and the CSMS sees the statuses in the order
the spec gives. (The install itself, by the privileged installer, is covered in
tests/agent/features/firmware/test_installer.py.)"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.agent.features.firmware.servers import FileServer
from tests.agent.features.firmware.test_installer import build_deb
from tests.conftest import CP_ID, PASSWORD, AgentFactory, server_context, start_charging


@pytest.fixture
def files(ca: trustme.CA) -> Iterator[FileServer]:
    with FileServer(server_context(ca)) as server:
        yield server


def statuses(csms: Csms, action: str, after: int = 0) -> list[str]:
    return [m["status"] for m in csms.messages(action)[after:]]


async def test_get_diagnostics_uploads_a_redacted_bundle(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path
) -> None:
    await make_agent(extra=f'[firmware]\nca_file = "{ca_file}"\n')
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    answer = await csms.call(CP_ID, call.GetDiagnostics(location=files.url("/upload")))
    name = answer["fileName"]
    assert name.endswith(".tar.gz")
    await csms.wait_message(
        "DiagnosticsStatusNotification", lambda p: p["status"] == "Uploaded", timeout_s=30
    )
    assert statuses(csms, "DiagnosticsStatusNotification") == ["Uploading", "Uploaded"]
    (upload,) = files.state.uploads
    assert upload.method == "PUT" and upload.path == f"/upload/{name}"
    with tarfile.open(fileobj=io.BytesIO(upload.body)) as bundle:
        members = {m.name: bundle.extractfile(m) for m in bundle.getmembers() if m.isfile()}
        texts = {n: f.read().decode() for n, f in members.items() if f is not None}
    assert PASSWORD not in "".join(texts.values())
    status = next(json.loads(t) for n, t in texts.items() if n.endswith("status.json"))
    assert status["connectors"][0]["id"] == 1  # the agent's own status, as evcp status has it
    assert csms.errors == []


async def test_an_update_waits_for_the_transaction_and_blocks_new_ones(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    """UpdateFirmware during a transaction: downloaded at once, installed only once the
    transaction has ended; while Installing, no connector takes a car (Unavailable)."""
    files.state.files["/evcp.deb"] = build_deb(tmp_path / "evcp.deb", "9.9.9").read_bytes()
    agent = await make_agent(extra=f'[firmware]\nca_file = "{ca_file}"\n')
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    tx_id = await start_charging(agent, csms)
    mark = len(csms.received)
    await csms.call(
        CP_ID,
        call.UpdateFirmware(location=files.url("/evcp.deb"), retrieve_date="2020-01-01T00:00:00Z"),
    )
    await csms.wait_message("FirmwareStatusNotification", lambda p: p["status"] == "Downloaded")
    triggered = await csms.call(
        CP_ID, call.TriggerMessage(requested_message="FirmwareStatusNotification")
    )
    assert triggered["status"] == "Accepted"
    await csms.wait_for(lambda: len(csms.messages("FirmwareStatusNotification")) >= 3)
    # Downloaded (and, triggered, Downloaded again): no Installing while the car charges.
    assert statuses(csms, "FirmwareStatusNotification") == [
        "Downloading", "Downloaded", "Downloaded",
    ]  # fmt: skip
    stop_mark = len(csms.received)
    await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await csms.wait_message("StopTransaction", after=stop_mark)
    await csms.wait_message("FirmwareStatusNotification", lambda p: p["status"] == "Installing")
    await csms.wait_message(
        "StatusNotification",
        lambda p: p["connectorId"] == 1 and p["status"] == "Unavailable",
        after=stop_mark,
    )
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="TAG-2", connector_id=1))
    assert answer["status"] == "Rejected"
    actions = [m.action for m in csms.received[mark:]]
    installing = next(
        i for i, m in enumerate(csms.received[mark:]) if m.payload.get("status") == "Installing"
    )
    assert actions.index("StopTransaction") < installing
    assert csms.errors == []


async def test_a_download_that_is_not_an_evcp_package_fails_after_the_retries(
    make_agent: AgentFactory, csms: Csms, files: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    """A corrupt download (here: not a Debian package at all; a package of another name
    is refused the same way) is fetched again, and after the retries DownloadFailed:
    nothing reaches the installer."""
    files.state.files["/evcp.deb"] = b"\x1f\x8b corrupt" * 4000
    agent = await make_agent(extra=f'[firmware]\nca_file = "{ca_file}"\n')
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await csms.call(
        CP_ID,
        call.UpdateFirmware(
            location=files.url("/evcp.deb"),
            retrieve_date="2020-01-01T00:00:00Z",
            retries=2,
            retry_interval=1,
        ),
    )
    await csms.wait_message(
        "FirmwareStatusNotification", lambda p: p["status"] == "DownloadFailed", timeout_s=60
    )
    assert statuses(csms, "FirmwareStatusNotification") == ["Downloading", "DownloadFailed"]
    gets = [r for r in files.state.requests if r.get("path") == "/evcp.deb"]
    assert len(gets) == 2  # two attempts, each fetching it whole
    spool = agent.config.parent / "state" / "firmware"
    assert not (spool / "install.request").exists()
    assert csms.errors == []


async def test_supported_feature_profiles_and_transfer_protocols(
    make_agent: AgentFactory, csms: Csms
) -> None:
    await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    keys = ["SupportedFeatureProfiles", "SupportedFileTransferProtocols"]
    answer = await csms.call(CP_ID, call.GetConfiguration(key=keys))
    values = {k["key"]: k["value"] for k in answer["configurationKey"]}
    assert "FirmwareManagement" in values["SupportedFeatureProfiles"].split(",")
    assert values["SupportedFileTransferProtocols"] == "FTPS,HTTPS"  # no allow_http
