"""Security profile 3 on the wire: a real WSS server on 127.0.0.1 that requires client
certificates (trustme CA for both ends), and the classification of connect failures into
the whitepaper's security events."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve

from agent.core.security import EventType
from agent.ocpp.transport import (
    TLS12_CIPHERS,
    classify,
    open_connection,
    security_event,
    tls_context,
)

CP_ID = "CP-SEC-1"


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA(organization_name="evcp test CPO")


@pytest.fixture
def client_files(client_ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """The charge point's certificate (CN = its id) and key, as files."""
    cert = client_ca.issue_cert(common_name=CP_ID)
    cert_file, key_file = tmp_path / "cp.pem", tmp_path / "cp.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


def mtls_server_context(
    ca: trustme.CA, client_ca: trustme.CA, *, tls12_only: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(ctx)
    return ctx


class Server:
    def __init__(self) -> None:
        self.port = 0
        self.peers: list[str] = []


@contextlib.asynccontextmanager
async def wss_server(ctx: ssl.SSLContext) -> AsyncIterator[Server]:
    state = Server()

    async def handler(ws: ServerConnection) -> None:
        peer = ws.transport.get_extra_info("peercert") or {}
        subject = dict(item[0] for item in peer.get("subject", ()))
        state.peers.append(subject.get("commonName", ""))
        await ws.send("hello")
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, ssl=ctx, subprotocols=["ocpp1.6"]) as server:  # type: ignore[list-item]
        state.port = next(iter(server.sockets)).getsockname()[1]
        yield state


class AlertingTlsServer:
    """A TLS server on a blocking socket (a thread): unlike asyncio's, it sends the TLS alert
    when a handshake fails, as nginx, Envoy or a cloud load balancer do."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.completed = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    with self.ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)  # TLS 1.3 checks the client certificate here
                        self.completed += 1
                except OSError:
                    pass

    def __enter__(self) -> AlertingTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()


async def attempt(port: int, ctx: ssl.SSLContext) -> BaseException | None:
    try:
        ws = await open_connection(
            url=f"wss://localhost:{port}/ocpp",
            charge_point_id=CP_ID,
            password=None,
            ssl_context=ctx,
            ping_interval_s=0,
            open_timeout_s=10,
        )
    except Exception as exc:
        return exc
    try:
        assert await ws.recv() == "hello"
    finally:
        await ws.close()
    return None


@pytest.mark.parametrize("tls12_only", [False, True])
async def test_client_certificate_is_accepted(
    ca: trustme.CA,
    ca_file: Path,
    client_ca: trustme.CA,
    client_files: tuple[str, str],
    tls12_only: bool,
) -> None:
    async with wss_server(mtls_server_context(ca, client_ca, tls12_only=tls12_only)) as server:
        ctx = tls_context(str(ca_file), *client_files)
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert await attempt(server.port, ctx) is None
        assert server.peers == [CP_ID]


async def test_no_client_certificate_under_tls13_is_failed_to_authenticate(
    ca: trustme.CA, ca_file: Path, client_ca: trustme.CA
) -> None:
    async with wss_server(mtls_server_context(ca, client_ca)) as server:
        exc = await attempt(server.port, tls_context(str(ca_file)))
        assert exc is not None
        assert server.peers == []
        assert security_event(exc, client_cert=False) is EventType.FAILED_TO_AUTHENTICATE_AT_CSMS


async def test_no_client_certificate_under_tls12_is_refused_by_an_alerting_server(
    ca: trustme.CA, ca_file: Path, client_ca: trustme.CA
) -> None:
    with AlertingTlsServer(mtls_server_context(ca, client_ca, tls12_only=True)) as server:
        exc = await attempt(server.port, tls_context(str(ca_file)))
        assert isinstance(exc, ssl.SSLError)
        assert exc.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
        assert server.completed == 0
        assert classify(exc).kind == "tls"


@pytest.mark.parametrize("tls12_only", [False, True])
async def test_client_certificate_from_another_ca_is_failed_to_authenticate(
    ca: trustme.CA, ca_file: Path, client_ca: trustme.CA, tmp_path: Path, tls12_only: bool
) -> None:
    stranger = trustme.CA().issue_cert(common_name=CP_ID)
    cert_file, key_file = tmp_path / "x.pem", tmp_path / "x.key"
    stranger.cert_chain_pems[0].write_to_path(str(cert_file))
    stranger.private_key_pem.write_to_path(str(key_file))
    ctx = tls_context(str(ca_file), str(cert_file), str(key_file))
    with AlertingTlsServer(mtls_server_context(ca, client_ca, tls12_only=tls12_only)) as alerting:
        exc = await attempt(alerting.port, ctx)
        assert exc is not None
        assert alerting.completed == 0
        assert security_event(exc, client_cert=True) is EventType.FAILED_TO_AUTHENTICATE_AT_CSMS
    async with wss_server(mtls_server_context(ca, client_ca, tls12_only=tls12_only)) as server:
        exc = await attempt(server.port, ctx)
        assert exc is not None
        assert server.peers == []
        if not tls12_only:  # asyncio sends no alert: TLS 1.2 gives a bare EOF (see report)
            assert security_event(exc, client_cert=True) is EventType.FAILED_TO_AUTHENTICATE_AT_CSMS


async def test_untrusted_server_certificate_is_invalid_central_system_certificate(
    ca: trustme.CA, client_ca: trustme.CA, client_files: tuple[str, str], tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with wss_server(mtls_server_context(ca, client_ca)) as server:
        exc = await attempt(server.port, tls_context(str(other), *client_files))
        assert exc is not None
        assert security_event(exc, client_cert=True) is EventType.INVALID_CENTRAL_SYSTEM_CERTIFICATE
        assert server.peers == []


async def test_tls11_only_server_is_invalid_tls_version(
    ca: trustme.CA, ca_file: Path, client_files: tuple[str, str]
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    async with wss_server(ctx) as server:
        for client_cert in (True, False):
            files = client_files if client_cert else ()
            exc = await attempt(server.port, tls_context(str(ca_file), *files))
            assert exc is not None
            assert security_event(exc, client_cert=client_cert) is EventType.INVALID_TLS_VERSION
        assert server.peers == []
    with AlertingTlsServer(ctx) as alerting:
        exc = await attempt(alerting.port, tls_context(str(ca_file), *client_files))
        assert exc is not None
        assert security_event(exc, client_cert=True) is EventType.INVALID_TLS_VERSION
        assert alerting.completed == 0


async def test_server_without_a_common_cipher_suite_is_invalid_tls_cipher_suite(
    ca: trustme.CA, ca_file: Path
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-SHA")  # SHA-1 CBC: left out of ours on purpose
    assert "ECDHE-RSA-AES128-SHA:" not in TLS12_CIPHERS + ":"
    ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA).configure_cert(ctx)
    with AlertingTlsServer(ctx) as server:
        exc = await attempt(server.port, tls_context(str(ca_file)))
        assert exc is not None
        assert security_event(exc, client_cert=False) is EventType.INVALID_TLS_CIPHER_SUITE
        assert server.completed == 0


def test_client_certificate_keeps_tls12_minimum_and_our_cipher_list(
    client_files: tuple[str, str], ca_file: Path
) -> None:
    with_cert = tls_context(str(ca_file), *client_files)
    without = tls_context(str(ca_file))
    assert with_cert.minimum_version is ssl.TLSVersion.TLSv1_2
    assert [c["name"] for c in with_cert.get_ciphers()] == [
        c["name"] for c in without.get_ciphers()
    ]


def test_key_that_does_not_match_the_certificate_is_refused_at_once(
    client_ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    client_ca.issue_cert(common_name=CP_ID).cert_chain_pems[0].write_to_path(str(cert_file))
    client_ca.issue_cert(common_name=CP_ID).private_key_pem.write_to_path(str(key_file))
    with pytest.raises(ssl.SSLError):
        tls_context(str(ca_file), str(cert_file), str(key_file))
