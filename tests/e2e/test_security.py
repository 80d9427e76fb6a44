"""Security profile 3 and the security extensions, end to end with the running agent: the
test CSMS over WSS asks for a certificate (ExtendedTriggerMessage), signs the charger's
CSR with a test CA, upgrades the charger to profile 3 and sees it come back with its
client certificate; security events arrive as SecurityEventNotification."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.agent.security import pki
from tests.conftest import CP_ID, PASSWORD, AgentFactory


@pytest.fixture
def cpo() -> pki.Ca:
    """The CPO's CA: signs charge-point certificates; installed on the charger as a
    CentralSystemRootCertificate, and trusted by the CSMS for client certificates."""
    return pki.make_ca("Test CPO Root")


@pytest.fixture
async def csms(ca: trustme.CA, cpo: pki.Ca) -> AsyncIterator[Csms]:
    """A CSMS that takes Basic Auth (profile 2) or a client certificate from ``cpo``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=cpo.pem)
    server = Csms(passwords={CP_ID: PASSWORD})
    await server.start(ctx)
    yield server
    await server.stop()


def events(csms: Csms) -> list[str]:
    return [m["type"] for m in csms.messages("SecurityEventNotification")]


async def get_key(csms: Csms, key: str) -> str:
    answer = await csms.call(CP_ID, call.GetConfiguration(key=[key]))
    return str(answer["configurationKey"][0]["value"])


async def certificate_for_the_charger(csms: Csms, cpo: pki.Ca) -> None:
    """Install the CPO root, have the charger make a key and a CSR, sign it."""
    answer = await csms.call(
        CP_ID,
        call.InstallCertificate(
            certificate_type="CentralSystemRootCertificate", certificate=cpo.pem
        ),
    )
    assert answer["status"] == "Accepted"
    mark = len(csms.messages("SignCertificate"))
    answer = await csms.call(
        CP_ID, call.ExtendedTriggerMessage(requested_message="SignChargePointCertificate")
    )
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: len(csms.messages("SignCertificate")) > mark, timeout_s=30)
    cert, subject = pki.sign_csr(cpo, csms.messages("SignCertificate")[-1]["csr"])
    assert subject.rfc4514_string().startswith(f"CN={CP_ID}")  # CN = charge point id
    signed = await csms.call(CP_ID, call.CertificateSigned(certificate_chain=pki.pem(cert)))
    assert signed["status"] == "Accepted"


async def test_startup_is_a_security_event(make_agent: AgentFactory, csms: Csms) -> None:
    await make_agent()
    await csms.wait_for(lambda: "StartupOfTheDevice" in events(csms), timeout_s=15)
    assert csms.errors == []


async def test_upgrade_to_profile_3_with_a_certificate_signed_on_request(
    make_agent: AgentFactory, csms: Csms, cpo: pki.Ca, tmp_path: Path
) -> None:
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await certificate_for_the_charger(csms, cpo)
    key_files = list((tmp_path / "agent0" / "state" / "certs").rglob("key.pem"))
    assert key_files and all(f.stat().st_mode & 0o077 == 0 for f in key_files)
    answer = await csms.call(CP_ID, call.ChangeConfiguration(key="SecurityProfile", value="3"))
    assert answer["status"] == "Accepted"
    await csms.wait_for(lambda: CP_ID in csms.client_cns, timeout_s=30)
    status: dict[str, Any] = await agent.wait_status(
        lambda s: s["security"]["profile"] == 3, timeout_s=30
    )
    assert status["security"]["cp_certificate_expires"] is not None
    assert await get_key(csms, "SecurityProfile") == "3"
    await csms.wait_for(lambda: "ReconfigurationOfSecurityParameters" in events(csms), timeout_s=15)
    # A downgrade is refused (the whitepaper: upgrade only).
    answer = await csms.call(CP_ID, call.ChangeConfiguration(key="SecurityProfile", value="2"))
    assert answer["status"] == "Rejected"
    assert csms.errors == []


async def test_profile_3_without_a_certificate_is_rejected(
    make_agent: AgentFactory, csms: Csms
) -> None:
    await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    answer = await csms.call(CP_ID, call.ChangeConfiguration(key="SecurityProfile", value="3"))
    assert answer["status"] == "Rejected"
    assert await get_key(csms, "SecurityProfile") == "2"


async def test_a_certificate_the_csms_refuses_falls_back_to_profile_2(
    make_agent: AgentFactory, csms: Csms, cpo: pki.Ca
) -> None:
    """The CSMS signs with a CA it does not trust for client certificates: profile 3
    cannot connect, the charger goes back to profile 2 within the bound and says so."""
    other = pki.make_ca("Another Root")
    agent = await make_agent(extra="[security]\nprofile_fallback_s = 5\n")
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    answer = await csms.call(
        CP_ID,
        call.InstallCertificate(
            certificate_type="CentralSystemRootCertificate", certificate=other.pem
        ),
    )
    assert answer["status"] == "Accepted"
    await csms.call(
        CP_ID, call.ExtendedTriggerMessage(requested_message="SignChargePointCertificate")
    )
    await csms.wait_for(lambda: bool(csms.messages("SignCertificate")), timeout_s=30)
    cert, _ = pki.sign_csr(other, csms.messages("SignCertificate")[-1]["csr"])
    signed = await csms.call(CP_ID, call.CertificateSigned(certificate_chain=pki.pem(cert)))
    assert signed["status"] == "Accepted"
    connections = csms.connections
    answer = await csms.call(CP_ID, call.ChangeConfiguration(key="SecurityProfile", value="3"))
    assert answer["status"] == "Accepted"
    await csms.wait_for(
        lambda: csms.connections > connections and csms.connected(CP_ID), timeout_s=40
    )
    await csms.wait_for(
        lambda: any(
            m["type"] == "ReconfigurationOfSecurityParameters"
            and "back to 2" in m.get("techInfo", "")
            for m in csms.messages("SecurityEventNotification")
        ),
        timeout_s=40,
    )
    assert (await agent.status())["security"]["profile"] == 2
    assert await get_key(csms, "SecurityProfile") == "2"
    assert CP_ID not in csms.client_cns


async def test_a_wrong_password_is_reported_once_connected_again(
    make_agent: AgentFactory, csms: Csms
) -> None:
    csms.passwords[CP_ID] = "not-the-password-at-all"
    await make_agent()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while csms.auth_failures < 2:  # (refusals are counted, not notified: poll)
        assert loop.time() < deadline, "the CSMS never refused the charger"
        await asyncio.sleep(0.05)
    csms.passwords[CP_ID] = PASSWORD
    await csms.wait_for(lambda: "FailedToAuthenticateAtCsms" in events(csms), timeout_s=30)
    assert events(csms).count("FailedToAuthenticateAtCsms") == 1
