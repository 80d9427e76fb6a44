"""The security service over a real WSS connection, both ends speaking OCPP through the
``ocpp`` library (which checks every security-extension message against its JSON schema).

The charge-point end here is a minimal session written for this test: it wires the
service's methods into ``@on``/``@after`` handlers exactly as the report describes for
``agent/ocpp/handlers/security.py``, and implements the service's port on a real
connection (``transport.open_connection`` with ``tls_context``). Only the durable queue is
a list (the agent's outbox is not part of this package); the test says so where it checks it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agent.features.security import crypto
from agent.features.security.certs import CertStore
from agent.features.security.crypto import HelperCrypto, InProcessCrypto
from agent.features.security.events import SecurityEvents, SecurityLog
from agent.features.security.keys import KEYS
from agent.features.security.service import SecurityService
from agent.ocpp.security_connect import NoCertificateError, connect_settings
from agent.ocpp.transport import classify, open_connection, security_event
from tests.agent.security import pki

CP_ID = "CP-SEC-7"
PASSWORD = "0123456789abcdef-sec"


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} never happened")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- the test CSMS
class _CsmsSide(ChargePoint):
    def __init__(self, cp_id: str, ws: ServerConnection, csms: SecurityCsms) -> None:
        super().__init__(cp_id, ws, response_timeout=15)
        self.csms = csms

    @on(Action.sign_certificate)
    def on_sign(self, csr: str, **_: Any) -> Any:
        self.csms.csrs.append(csr)
        return call_result.SignCertificate(status="Accepted")

    @after(Action.sign_certificate)
    async def after_sign(self, csr: str, **_: Any) -> None:
        if self.csms.signer is None:
            return
        cert, _subject = pki.sign_csr(self.csms.signer, csr, **self.csms.sign_args)
        result = await self.call(call.CertificateSigned(certificate_chain=pki.pem(cert)))
        self.csms.signed_results.append(result.status)

    @on(Action.security_event_notification)
    def on_event(self, type: str, timestamp: str, **_: Any) -> Any:
        self.csms.events.append(type)
        return call_result.SecurityEventNotification()


class SecurityCsms:
    """Accepts Basic Auth, or a client certificate from ``client_trust`` instead."""

    def __init__(self, ca: trustme.CA, client_trust: pki.Ca) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.ctx)
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx.load_verify_locations(cadata=client_trust.pem)
        self.signer: pki.Ca | None = client_trust
        self.sign_args: dict[str, Any] = {}
        self.csrs: list[str] = []
        self.events: list[str] = []
        self.signed_results: list[str] = []
        #: For each accepted connection: the client certificate's CN, or None (Basic Auth).
        self.connections: list[str | None] = []
        self.cp: _CsmsSide | None = None
        self.port = 0
        self._server: Server | None = None

    def _auth(self, connection: ServerConnection, request: Request) -> Response | None:
        if connection.transport.get_extra_info("peercert"):
            return None
        expected = "Basic " + base64.b64encode(f"{CP_ID}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        peer = ws.transport.get_extra_info("peercert") or {}
        subject = dict(item[0] for item in peer.get("subject", ()))
        self.connections.append(subject.get("commonName"))
        self.cp = _CsmsSide(CP_ID, ws, self)
        with contextlib.suppress(ConnectionClosed):
            await self.cp.start()

    async def call(self, payload: Any) -> Any:
        await eventually(lambda: self.cp is not None, "a connection")
        assert self.cp is not None
        return await self.cp.call(payload, suppress=False)

    async def __aenter__(self) -> SecurityCsms:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            ssl=self.ctx,
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            process_request=self._auth,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


# ---------------------------------------------------------------------- the charge point end
class _CpSide(ChargePoint):
    """The handlers as agent/ocpp/handlers/security.py will have them."""

    def __init__(self, ws: ClientConnection, service: SecurityService) -> None:
        super().__init__(CP_ID, ws, response_timeout=15)
        self.service = service

    @on(Action.certificate_signed)
    async def on_certificate_signed(self, certificate_chain: str, **_: Any) -> Any:
        return call_result.CertificateSigned(
            status=await self.service.certificate_signed(certificate_chain)
        )

    @after(Action.certificate_signed)
    async def after_certificate_signed(self, **_: Any) -> None:
        await self.service.after_certificate_signed()

    @on(Action.install_certificate)
    async def on_install(self, certificate_type: str, certificate: str, **_: Any) -> Any:
        status = await self.service.install_certificate(certificate_type, certificate)
        return call_result.InstallCertificate(status=status)

    @on(Action.get_installed_certificate_ids)
    def on_ids(self, certificate_type: str, **_: Any) -> Any:
        status, data = self.service.get_installed_certificate_ids(certificate_type)
        return call_result.GetInstalledCertificateIds(
            status=status, certificate_hash_data=data or None
        )

    @on(Action.delete_certificate)
    def on_delete(self, certificate_hash_data: dict[str, str], **_: Any) -> Any:
        return call_result.DeleteCertificate(
            status=self.service.delete_certificate(certificate_hash_data)
        )

    @on(Action.change_configuration)
    def on_change(self, key: str, value: str, **_: Any) -> Any:
        if key == "SecurityProfile":
            return call_result.ChangeConfiguration(
                status=self.service.change_security_profile(value)
            )
        return call_result.ChangeConfiguration(status="NotSupported")

    @after(Action.change_configuration)
    async def after_change(self, key: str, **_: Any) -> None:
        if key == "SecurityProfile":
            await self.service.apply_security_profile()

    @on(Action.extended_trigger_message)
    def on_trigger(self, requested_message: str, **_: Any) -> Any:
        if requested_message == "SignChargePointCertificate":
            return call_result.ExtendedTriggerMessage(
                status=self.service.trigger_sign_certificate()
            )
        return call_result.ExtendedTriggerMessage(status="NotImplemented")

    @after(Action.extended_trigger_message)
    async def after_trigger(self, requested_message: str, **_: Any) -> None:
        if requested_message == "SignChargePointCertificate":
            await self.service.send_sign_certificate()


class WirePort:
    """The service's port on a real connection. ``durable`` stands in for the agent's
    outbox (a list: the outbox is the session's, not this package's)."""

    def __init__(self, url: str, ca_file: Path, store: CertStore) -> None:
        self.url = url
        self.password = PASSWORD
        self.ca_file = ca_file
        self.store = store
        self.service: SecurityService | None = None
        self.durable: list[tuple[str, dict[str, Any]]] = []
        self.profiles: list[int] = []  # every connected profile, in order
        self.failures: list[BaseException] = []
        self._ws: ClientConnection | None = None
        self._cp: _CpSide | None = None
        self._task: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return datetime.now(UTC)

    def enqueue_durable(self, action: str, payload: dict[str, Any]) -> None:
        self.durable.append((action, payload))

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        assert self._cp is not None
        request = getattr(call, action)(**camel_to_snake_case(payload))
        result = await self._cp.call(request, suppress=False)
        answer: dict[str, Any] = snake_to_camel_case(asdict(result))
        return answer

    async def connect(self, profile: int) -> bool:
        assert self.service is not None
        try:
            settings = connect_settings(
                profile, store=self.store, ca_file=str(self.ca_file), password=self.password
            )
        except NoCertificateError:
            return False
        try:
            ws = await open_connection(
                url=self.url,
                charge_point_id=CP_ID,
                password=settings.password,
                ssl_context=settings.ssl_context,
                ping_interval_s=0,
                open_timeout_s=10,
            )
        except Exception as exc:
            self.failures.append(exc)
            self.service.connect_failed(
                security_event(exc, client_cert=settings.client_certificate),
                classify(exc).detail,
            )
            return False
        self._ws = ws
        self._cp = _CpSide(ws, self.service)
        self._task = asyncio.get_running_loop().create_task(self._run(self._cp))
        self.profiles.append(profile)
        await self.service.on_connected()
        return True

    async def _run(self, cp: _CpSide) -> None:
        with contextlib.suppress(ConnectionClosed):
            await cp.start()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
            self._cp = None

    async def reconnect(self, profile: int) -> bool:
        await self.close()
        return await self.connect(profile)


class Keys(dict[str, str]):
    """The security KeySpecs' defaults in a dict (the registry merge is the lead's)."""

    def __init__(self, **values: str) -> None:
        super().__init__({spec.name: spec.default for spec in KEYS}, **values)

    def raw(self, name: str) -> str:
        return self[name]

    def set(self, key: str, value: str) -> None:
        self[key] = value


# ---------------------------------------------------------------------- fixtures
class Rig:
    def __init__(self, tmp_path: Path, ca: trustme.CA, ca_file: Path, csms: SecurityCsms) -> None:
        self.dir = tmp_path
        self.ca = ca
        self.csms = csms
        self.store = CertStore(tmp_path)
        self.log = SecurityLog(tmp_path / "security.log")
        self.port = WirePort(f"wss://localhost:{csms.port}/ocpp", ca_file, self.store)
        self.keys = Keys(CpoName="ACME CPO")
        self.service = SecurityService(
            store=self.store,
            events=SecurityEvents(self.log, self.port),
            crypto=InProcessCrypto(),
            keys=self.keys,
            port=self.port,
            charge_point_id=CP_ID,
            password_configured=True,
            reconnect_bound_s=15,
        )
        self.port.service = self.service

    def logged(self) -> list[str]:
        return [entry["type"] for entry in self.log.entries()]

    async def install_csms_root(self) -> None:
        """The CSMS's server root, and the CPO root that signs charge-point certificates."""
        roots = [self.ca.cert_pem.bytes().decode()]
        if self.csms.signer is not None:
            roots.append(self.csms.signer.pem)
        for pem in roots:
            result = await self.csms.call(
                call.InstallCertificate(
                    certificate_type="CentralSystemRootCertificate", certificate=pem
                )
            )
            assert result.status == "Accepted"

    async def get_certificate(self) -> None:
        """ExtendedTriggerMessage(SignChargePointCertificate) and the round trip after it."""
        before = len(self.csms.signed_results)
        result = await self.csms.call(
            call.ExtendedTriggerMessage(requested_message="SignChargePointCertificate")
        )
        assert result.status == "Accepted"
        await eventually(lambda: len(self.csms.signed_results) > before, "CertificateSigned")


@pytest.fixture
async def client_ca() -> pki.Ca:
    return pki.make_ca("CPO Sub-CA for charge points")


@pytest.fixture
async def rig(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, client_ca: pki.Ca
) -> AsyncIterator[Rig]:
    async with SecurityCsms(ca, client_ca) as csms:
        rig = Rig(tmp_path, ca, ca_file, csms)
        assert await rig.port.connect(2)
        yield rig
        await rig.port.close()


# ---------------------------------------------------------------------- tests
async def test_upgrade_2_to_3_with_a_csr_made_on_the_charger(rig: Rig) -> None:
    # No CP certificate yet: profile 3 is refused.
    assert (
        await rig.csms.call(call.ChangeConfiguration(key="SecurityProfile", value="3"))
    ).status == "Rejected"
    await rig.install_csms_root()
    ids = await rig.csms.call(
        call.GetInstalledCertificateIds(certificate_type="CentralSystemRootCertificate")
    )
    assert ids.status == "Accepted"
    roots = [rig.ca.cert_pem.bytes().decode(), rig.csms.signer.pem if rig.csms.signer else ""]
    expected = [crypto.certificate_info(pem) for pem in roots]
    # (the library checked the camelCase payload against the schema and hands it over in
    # snake_case)
    fields = ("hash_algorithm", "issuer_name_hash", "issuer_key_hash", "serial_number")
    assert sorted(ids.certificate_hash_data, key=lambda d: d["serial_number"]) == sorted(
        ({name: e[name] for name in fields} for e in expected),
        key=lambda d: d["serial_number"],
    )
    await rig.get_certificate()
    assert rig.csms.signed_results == ["Accepted"]
    csr = x509.load_pem_x509_csr(rig.csms.csrs[0].encode())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CP_ID
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ACME CPO"
    assert rig.service.snapshot()["profile"] == 2
    expires = rig.service.snapshot()["cp_certificate_expires"]
    assert expires is not None and datetime.fromisoformat(expires) > datetime.now(UTC)

    answer = await rig.csms.call(call.ChangeConfiguration(key="SecurityProfile", value="3"))
    assert answer.status == "Accepted"
    await eventually(lambda: rig.keys["SecurityProfile"] == "3", "profile 3")
    assert rig.csms.connections == [None, CP_ID]  # Basic Auth first, then the certificate
    assert rig.port.profiles == [2, 3]
    assert rig.service.snapshot() == {"profile": 3, "cp_certificate_expires": expires}
    assert "ReconfigurationOfSecurityParameters" in rig.logged()
    # Down again is refused, and nothing reconnects.
    answer = await rig.csms.call(call.ChangeConfiguration(key="SecurityProfile", value="2"))
    assert answer.status == "Rejected"
    assert rig.port.profiles == [2, 3]

    # At profile 3 a renewed certificate is used for a new connection, the old one dropped.
    await rig.get_certificate()
    await eventually(lambda: not rig.store.has_previous_cp(), "the old certificate dropped")
    assert rig.csms.connections == [None, CP_ID, CP_ID]  # reconnected with the new one


async def test_new_certificate_the_csms_refuses_falls_back_to_profile_2(
    rig: Rig,
) -> None:
    rig.csms.signer = pki.make_ca("A CA the CSMS signs with but does not trust")
    await rig.install_csms_root()
    await rig.get_certificate()
    answer = await rig.csms.call(call.ChangeConfiguration(key="SecurityProfile", value="3"))
    assert answer.status == "Accepted"
    await eventually(
        lambda: "ReconfigurationOfSecurityParameters" in rig.logged(), "fallback reported"
    )
    assert rig.port.profiles == [2, 2]
    assert rig.keys["SecurityProfile"] == "2"
    assert rig.csms.connections == [None, None]
    logged = rig.logged()
    assert "FailedToAuthenticateAtCsms" in logged
    assert logged[-1] == "ReconfigurationOfSecurityParameters"
    entries = list(rig.log.entries())
    assert "back to 2" in entries[-1]["techInfo"]
    # The refusal reached the CSMS once connected again (non-critical: sent, not queued).
    await eventually(lambda: "FailedToAuthenticateAtCsms" in rig.csms.events, "event sent")
    assert rig.port.durable == []


@pytest.mark.parametrize("case", ["too long", "expired", "other key", "other root"])
async def test_certificate_signed_that_does_not_fit_is_rejected(rig: Rig, case: str) -> None:
    rig.csms.signer = None  # the test answers the CSR itself
    await rig.install_csms_root()
    result = await rig.csms.call(
        call.ExtendedTriggerMessage(requested_message="SignChargePointCertificate")
    )
    assert result.status == "Accepted"
    await eventually(lambda: bool(rig.csms.csrs), "the CSR")
    root = pki.make_ca("Not installed") if case == "other root" else pki.Ca(*_trustme_ca(rig.ca))
    if case == "other key":
        cert = pki.issue(root, pki.new_key().public_key(), x509.Name([]))
    elif case == "expired":
        now = datetime.now(UTC)
        cert, _ = pki.sign_csr(
            root,
            rig.csms.csrs[0],
            not_before=now - timedelta(days=10),
            not_after=now - timedelta(seconds=1),
        )
    else:
        cert, _ = pki.sign_csr(root, rig.csms.csrs[0])
    chain = pki.pem(cert)
    if case == "too long":
        rig.keys["CertificateSignedMaxChainSize"] = str(len(chain) - 1)
    answer = await rig.csms.call(call.CertificateSigned(certificate_chain=chain))
    assert answer.status == "Rejected"
    assert rig.store.cp_files() is None
    assert rig.logged() == ["InvalidChargePointCertificate"]


def _trustme_ca(ca: trustme.CA) -> tuple[Any, x509.Certificate]:
    """trustme's CA as a pki.Ca (its key is private to trustme: read back from its PEM)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    return key, x509.load_pem_x509_certificate(ca.cert_pem.bytes())


async def test_last_root_cannot_be_deleted_over_the_wire(rig: Rig) -> None:
    rig.csms.signer = None  # one root only
    await rig.install_csms_root()
    ids = await rig.csms.call(
        call.GetInstalledCertificateIds(certificate_type="CentralSystemRootCertificate")
    )
    (only,) = ids.certificate_hash_data
    assert (await rig.csms.call(call.DeleteCertificate(certificate_hash_data=only))).status == (
        "Failed"
    )
    second = pki.make_ca("Second CSMS root")
    answer = await rig.csms.call(
        call.InstallCertificate(
            certificate_type="CentralSystemRootCertificate", certificate=second.pem
        )
    )
    assert answer.status == "Accepted"
    assert (await rig.csms.call(call.DeleteCertificate(certificate_hash_data=only))).status == (
        "Accepted"
    )
    assert (await rig.csms.call(call.DeleteCertificate(certificate_hash_data=only))).status == (
        "NotFound"
    )
    none = await rig.csms.call(
        call.GetInstalledCertificateIds(certificate_type="ManufacturerRootCertificate")
    )
    assert none.status == "NotFound"


async def test_certificate_near_expiry_is_renewed_on_connect(rig: Rig) -> None:
    await rig.install_csms_root()
    rig.csms.sign_args = {"not_after": datetime.now(UTC) + timedelta(days=10)}
    await rig.get_certificate()
    assert len(rig.csms.csrs) == 1
    rig.csms.sign_args = {}
    assert await rig.port.reconnect(2)
    await eventually(lambda: len(rig.csms.signed_results) == 2, "the renewal")
    not_after = rig.store.cp_not_after()
    assert not_after is not None and not_after > datetime.now(UTC) + timedelta(days=300)


async def test_wrong_password_untrusted_csms_and_tls11_each_reported_once_connected(
    rig: Rig, tmp_path: Path
) -> None:
    good = rig.port.url
    rig.port.password = "wrong-password-0000"
    for _attempt in range(3):  # a retry loop: reported once, not three times
        assert not await rig.port.reconnect(2)
    rig.port.password = PASSWORD
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    saved = rig.port.ca_file
    rig.port.ca_file = other
    assert not await rig.port.reconnect(2)
    rig.port.ca_file = saved
    assert await rig.port.reconnect(2)
    await eventually(lambda: len(rig.csms.events) == 2, "both events")
    assert sorted(rig.csms.events) == [
        "FailedToAuthenticateAtCsms",
        "InvalidCentralSystemCertificate",
    ]
    assert sorted(rig.logged()) == sorted(rig.csms.events)
    # A TLS 1.1-only CSMS: InvalidTLSVersion, sent once connected again.
    old_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_server.minimum_version = ssl.TLSVersion.TLSv1_1
        old_server.maximum_version = ssl.TLSVersion.TLSv1_1
    old_server.set_ciphers("DEFAULT:@SECLEVEL=0")
    rig.ca.issue_cert("localhost", "127.0.0.1").configure_cert(old_server)
    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, ssl=old_server) as tls11:
        rig.port.url = f"wss://localhost:{next(iter(tls11.sockets)).getsockname()[1]}/ocpp"
        assert not await rig.port.reconnect(2)
    rig.port.url = good
    assert await rig.port.reconnect(2)
    await eventually(lambda: "InvalidTLSVersion" in rig.csms.events, "InvalidTLSVersion sent")


async def test_signed_firmware_through_the_helper_process(rig: Rig, tmp_path: Path) -> None:
    rig.service.crypto = HelperCrypto()
    maker = pki.make_ca("Manufacturer root", kind="rsa")
    answer = await rig.csms.call(
        call.InstallCertificate(
            certificate_type="ManufacturerRootCertificate", certificate=maker.pem
        )
    )
    assert answer.status == "Accepted"
    key = pki.new_key("rsa")
    signer = pki.pem(pki.issue(maker, key.public_key(), x509.Name([]), client=False))
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"\x7fELF" + bytes(range(256)) * 400)
    signature = pki.sign_file(key, firmware)

    assert await rig.service.accept_signed_update(signer) == "Accepted"
    assert await rig.service.verify_firmware(firmware, signature, signer) == "SignatureVerified"
    assert rig.logged() == []

    bad = base64.b64encode(bytes(len(base64.b64decode(signature)))).decode()
    assert await rig.service.verify_firmware(firmware, bad, signer) == "InvalidSignature"
    assert rig.logged() == ["InvalidFirmwareSignature"]

    stranger_key = pki.new_key()
    stranger = pki.pem(
        pki.issue(pki.make_ca("Not the manufacturer"), stranger_key.public_key(), x509.Name([]))
    )
    assert await rig.service.accept_signed_update(stranger) == "InvalidCertificate"
    assert (
        await rig.service.verify_firmware(firmware, pki.sign_file(stranger_key, firmware), stranger)
        == "InvalidCertificate"
    )
    assert rig.logged() == [
        "InvalidFirmwareSignature",
        "InvalidFirmwareSigningCertificate",
        "InvalidFirmwareSigningCertificate",
    ]
    assert rig.port.durable == []  # none of these is critical
