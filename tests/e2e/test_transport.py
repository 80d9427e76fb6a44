"""The WSS link to the CSMS, end to end: TLS policy, certificates, Basic Auth, the
AuthorizationKey, and liveness (pings, dropped connections).

Everything here is real: TLS with trustme certificates, the ``ocpp``-library CSMS of
``agent/ocpp/csms.py`` and the agent running on simulated hardware. What is asserted is
what a user sees: ``evcp status`` (connected, last_error), what the CSMS receives, and the
log lines (which must never carry a secret).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from agent.ocpp.transport import TLS_READ_SIZE, tls_context
from tests.conftest import (
    CP_ID,
    PASSWORD,
    AgentFactory,
    RunningAgent,
    server_context,
    status_is,
)

#: ELBSecurityPolicy-TLS-1-2-Ext-2018-06 (OpenSSL names), from the ev.energy requirements.
ELB_2018_06_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES128-SHA256",
    "AES128-SHA",
    "AES256-GCM-SHA384",
    "AES256-SHA256",
    "AES256-SHA",
)


# ---------------------------------------------------------------------- helpers
async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` (for state nobody notifies about, e.g. auth_failures)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} never became true")
        await asyncio.sleep(0.02)


def alive(agent: RunningAgent) -> bool:
    return agent.task is not None and not agent.task.done()


def last_error(prefix: str) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        error = status["csms"]["last_error"] or ""
        return not status["csms"]["connected"] and error.startswith(prefix)

    return check


def connect_failures(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "evcp.session"
        and r.getMessage().startswith(f"cannot connect to the CSMS ({kind}:")
    ]


#: The suites of that policy with SHA-1 CBC, which the agent leaves out on purpose.
ELB_SHA1_CBC_CIPHERS = tuple(c for c in ELB_2018_06_CIPHERS if c.endswith("-SHA"))


def elb_server_context(
    ca: trustme.CA,
    key_type: trustme.KeyType,
    *,
    ciphers: tuple[str, ...] = ELB_2018_06_CIPHERS,
    server_preference: bool = True,
) -> ssl.SSLContext:
    """A server limited to ELBSecurityPolicy-TLS-1-2-Ext-2018-06: TLS 1.2 only.

    With ``server_preference`` (as an ELB does) the server picks the suite; without it the
    client's order decides.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(ciphers))
    if server_preference:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:  # Python sets it by default on server contexts
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ca.issue_cert("localhost", "127.0.0.1", key_type=key_type).configure_cert(ctx)
    return ctx


def tls11_server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@contextlib.asynccontextmanager
async def extra_csms(ctx: ssl.SSLContext, password: str = PASSWORD) -> AsyncIterator[Csms]:
    server = Csms(passwords={CP_ID: password})
    await server.start(ctx)
    try:
        yield server
    finally:
        await server.stop()


def url_of(port: int) -> str:
    return f"wss://localhost:{port}/ocpp"


class BlockingTlsServer:
    """A TLS server on plain blocking sockets (a thread), like most real servers: unlike an
    asyncio server it does send the TLS alert when the handshake fails."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.failed_handshakes = 0
        self.completed_handshakes = 0
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
                    with self.ctx.wrap_socket(conn, server_side=True):
                        self.completed_handshakes += 1
                except OSError:  # ssl.SSLError included
                    self.failed_handshakes += 1

    def __enter__(self) -> BlockingTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()


# ---------------------------------------------------------------------- TLS
async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """One TLS handshake with a server using ``server_ctx``: (suite, version) negotiated."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        ssl_object = writer.get_extra_info("ssl_object")
        name, version, _bits = ssl_object.cipher()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return name, version


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
async def test_handshake_with_elb_policy_server_prefers_ecdhe_gcm(
    ca: trustme.CA, ca_file: Path, key_type: trustme.KeyType
) -> None:
    """Our client context against a TLS-1.2-only server with the ELB 2018-06 suites and no
    preference of its own: the agent's order decides, and it puts ECDHE with AES-GCM first
    (among them AES-128, the cheaper one)."""
    server_ctx = elb_server_context(ca, key_type, server_preference=False)
    name, version = await handshake(server_ctx, tls_context(str(ca_file)))
    assert version == "TLSv1.2"
    assert name in ELB_2018_06_CIPHERS
    auth = "ECDSA" if key_type is trustme.KeyType.ECDSA else "RSA"
    assert name == f"ECDHE-{auth}-AES128-GCM-SHA256"


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
async def test_server_offering_only_sha1_cbc_suites_is_refused(
    ca: trustme.CA, ca_file: Path, key_type: trustme.KeyType
) -> None:
    """The ELB policy's SHA-1 CBC suites are left out of the agent's list on purpose: a
    server that offers nothing else gets no handshake."""
    server_ctx = elb_server_context(ca, key_type, ciphers=ELB_SHA1_CBC_CIPHERS)
    # The server itself works: a client that accepts those suites gets one.
    willing = ssl.create_default_context(cafile=str(ca_file))
    willing.set_ciphers(":".join(ELB_SHA1_CBC_CIPHERS))
    name, _version = await handshake(server_ctx, willing)
    assert name in ELB_SHA1_CBC_CIPHERS
    # A server that sends the alert: the refusal is a clean TLS error.
    with BlockingTlsServer(server_ctx) as server, pytest.raises(ssl.SSLError):
        await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls_context(str(ca_file)), server_hostname="localhost"
        )
    assert (server.completed_handshakes, server.failed_handshakes) == (0, 1)


async def test_agent_connects_and_boots_against_elb_policy_server(
    make_agent: AgentFactory, ca: trustme.CA
) -> None:
    async with extra_csms(elb_server_context(ca, trustme.KeyType.ECDSA)) as elb:
        agent = await make_agent(url=url_of(elb.port))
        await elb.wait_message("BootNotification")
        await elb.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
        status = await agent.wait_status(lambda s: s["csms"]["connected"])
        assert status["csms"]["last_error"] is None
        assert status["csms"]["registered"] is True
        assert elb.errors == []
        await agent.stop()


async def test_tls11_only_server_is_refused(
    make_agent: AgentFactory, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with extra_csms(tls11_server_context(ca)) as old:
        agent = await make_agent(url=url_of(old.port))
        status = await agent.wait_status(last_error("tls"))
        assert status["csms"]["registered"] is False
        # It keeps retrying (with back-off), and never gets past the TLS handshake.
        await eventually(lambda: len(connect_failures(caplog, "tls")) >= 3, what="3 TLS failures")
        assert old.connections == 0
        assert old.auth_failures == 0  # no HTTP request: the password was never sent
        assert old.received == []
        assert alive(agent)
        status = await agent.status()
        assert status["csms"]["connected"] is False
        await agent.stop()


async def test_tls11_only_server_sending_an_alert_is_refused(
    make_agent: AgentFactory, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with BlockingTlsServer(tls11_server_context(ca)) as old:
        agent = await make_agent(url=url_of(old.port))
        await agent.wait_status(last_error("tls"))
        await eventually(lambda: old.failed_handshakes >= 3, what="3 failed handshakes")
        assert old.completed_handshakes == 0
        assert alive(agent)
        await agent.stop()


async def test_server_certificate_from_an_untrusted_ca_is_refused(
    make_agent: AgentFactory,
    csms: Csms,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other_ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    agent = await make_agent(ca_file=other_ca_file)
    status = await agent.wait_status(last_error("tls"))
    assert "certificate" in status["csms"]["last_error"]
    await eventually(lambda: len(connect_failures(caplog, "tls")) >= 3, what="3 TLS failures")
    assert csms.connections == 0
    assert csms.auth_failures == 0  # the password never went to the untrusted server
    assert alive(agent)


async def test_server_certificate_for_another_host_is_refused(
    make_agent: AgentFactory, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with extra_csms(server_context(ca, "other.example")) as wrong:
        agent = await make_agent(url=url_of(wrong.port))
        status = await agent.wait_status(last_error("tls"))
        error = status["csms"]["last_error"]
        assert "certificate" in error
        assert "localhost" in error or "hostname" in error.lower()
        await eventually(lambda: len(connect_failures(caplog, "tls")) >= 2, what="2 TLS failures")
        assert wrong.connections == 0
        assert wrong.auth_failures == 0
        assert alive(agent)
        await agent.stop()


# ---------------------------------------------------------------------- Basic Auth
async def test_wrong_password_is_retried_with_backoff_until_the_csms_accepts_it(
    make_agent: AgentFactory, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    wrong = "not-the-right-password-42"
    agent = await make_agent(password=wrong)
    await eventually(lambda: csms.auth_failures >= 3, what="3 auth failures")
    status = await agent.wait_status(last_error("auth"))
    assert "401" in status["csms"]["last_error"]
    assert csms.connections == 0
    assert alive(agent)

    # The retry delays follow the configured back-off (0.1 s doubling up to 0.5 s, each
    # jittered within [d/2, d]): the agent does not hammer the CSMS.
    failures = connect_failures(caplog, "auth")
    assert len(failures) >= 3
    delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0]) for r in failures]
    nominal = [0.1, 0.2, 0.4] + [0.5] * len(delays)
    for delay, d in zip(delays, nominal, strict=False):
        assert round(d / 2, 1) <= delay <= d + 0.05, delays  # log shows one decimal

    # The operator fixes the password on the CSMS side: the agent gets in, no restart.
    csms.passwords[CP_ID] = wrong
    await csms.wait_message("BootNotification")
    status = await agent.wait_status(lambda s: s["csms"]["connected"])
    assert status["csms"]["last_error"] is None
    assert agent.restarts == []
    assert csms.connections == 1


# ---------------------------------------------------------------------- AuthorizationKey
def _secret_forms(secret: str) -> list[str]:
    """The secret, its Basic Auth token, and every 10-character piece of it."""
    token = base64.b64encode(f"{CP_ID}:{secret}".encode()).decode()
    pieces = [secret[i : i + 10] for i in range(len(secret) - 9)]
    return [secret, token, *pieces]


#: Loggers of the test CSMS (it runs in this process too); everything else is the agent's.
CSMS_LOGGERS = ("websockets.server", "evcp.csms")


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture, secrets: list[str]) -> None:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = []
    for record in caplog.records:
        if record.name.startswith(CSMS_LOGGERS):
            continue
        texts.append(formatter.format(record))
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    for secret in secrets:
        for form in _secret_forms(secret):
            for text in texts:
                assert form not in text, f"a log line carries (part of) a secret: {text[:300]}"


async def test_authorization_key_change_reconnects_persists_and_never_leaks(
    make_agent: AgentFactory, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    too_short = "Sh0rtKey-15char"
    too_long = "L0ngKey-" + "qWeRtYuIoPaSdFgHjKlZxCvBnM9876543"
    new_key = "Kq7vX2pLm9RtZ4wYb8NcHd3F"  # 15, 41 and 24 characters: 16 to 40 are allowed

    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    assert any(r.name == "evcp.ocpp" and r.getMessage().startswith("> ") for r in caplog.records)

    # A key shorter than 16 characters is refused, and the agent stays on the old one.
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="AuthorizationKey", value=too_short)
    )
    assert result["status"] == "Rejected"
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="AuthorizationKey", value=too_long)
    )
    assert result["status"] == "Rejected"

    # The key is write-only: never listed, and unknown when asked for by name.
    result = await csms.call(CP_ID, call.GetConfiguration())
    listed = {item["key"] for item in result["configurationKey"]}
    assert "AuthorizationKey" not in listed
    assert "HeartbeatInterval" in listed
    result = await csms.call(CP_ID, call.GetConfiguration(key=["AuthorizationKey"]))
    assert result.get("configurationKey", []) == []
    assert result["unknownKey"] == ["AuthorizationKey"]

    # A valid key: accepted, and the agent reconnects using it (the CSMS now accepts only
    # the new key, so the old one would be refused).
    assert csms.connections == 1
    csms.passwords[CP_ID] = new_key
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.ChangeConfiguration(key="AuthorizationKey", value=new_key))
    assert result["status"] == "Accepted"
    await csms.wait_for(lambda: csms.connections == 2)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=mark)
    assert csms.auth_failures == 0
    status = await agent.wait_status(lambda s: s["csms"]["connected"])
    assert status["csms"]["last_error"] is None

    # Restart the agent: it uses the stored key, not the one in its config file.
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    await csms.wait_message("BootNotification", after=mark)
    await csms.wait_for(lambda: csms.connections == 3)
    assert csms.auth_failures == 0
    await agent.wait_status(lambda s: s["csms"]["connected"])
    result = await csms.call(CP_ID, call.GetConfiguration())
    assert "AuthorizationKey" not in {item["key"] for item in result["configurationKey"]}
    await agent.stop()

    assert csms.errors == []
    assert_no_secret_logged(caplog, [PASSWORD, new_key, too_short, too_long])


async def test_wrong_password_never_logged(
    make_agent: AgentFactory, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-for-logs-0"
    agent = await make_agent(password=wrong)
    await eventually(lambda: csms.auth_failures >= 2, what="2 auth failures")
    await agent.stop()
    assert_no_secret_logged(caplog, [wrong])


# ---------------------------------------------------------------------- liveness
class Relay:
    """A TCP relay on 127.0.0.1 that can be frozen: while frozen no byte is forwarded in
    either direction (bytes are held, not dropped) and no connection is closed, like a
    network path that silently went dead."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class ConnectProxy(Relay):
    """An HTTP CONNECT proxy on 127.0.0.1 that only tunnels to 127.0.0.1 (RFC 9110 9.3.6)."""

    def __init__(self) -> None:
        super().__init__(upstream_port=0)
        self.requests: list[str] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line = head.split("\r\n", 1)[0]
        self.requests.append(request_line)
        method, target, _ = request_line.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.upstream_port = int(target.rsplit(":", 1)[1])
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await super()._accept(reader, writer)


async def test_agent_reaches_the_csms_through_an_http_connect_proxy(
    make_agent: AgentFactory, csms: Csms
) -> None:
    proxy = ConnectProxy()
    await proxy.start()
    try:
        agent = await make_agent(csms_extra=f'proxy = "http://127.0.0.1:{proxy.port}"')
        await csms.wait_message("BootNotification")
        await agent.wait_status(lambda s: s["csms"]["connected"])
        # TLS runs end to end through the tunnel: the proxy saw only the CONNECT line.
        assert proxy.requests == [f"CONNECT localhost:{csms.port} HTTP/1.1"]
        assert csms.errors == []
    finally:
        await proxy.stop()


async def test_unreachable_proxy_is_a_logged_network_failure_and_retried(
    make_agent: AgentFactory, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    caplog.set_level(logging.WARNING)
    agent = await make_agent(csms_extra=f'proxy = "http://127.0.0.1:{port}"')
    await eventually(lambda: len(connect_failures(caplog, "network")) >= 2)
    assert alive(agent)
    assert csms.connections == 0


@pytest.fixture
async def relay(csms: Csms) -> AsyncIterator[Relay]:
    r = Relay(csms.port)
    await r.start()
    yield r
    await r.stop()


def statuses_after(csms: Csms, mark: int) -> dict[int, str]:
    """connectorId -> last status the CSMS received after index ``mark``."""
    seen: dict[int, str] = {}
    for item in csms.received[mark:]:
        if item.action == "StatusNotification":
            seen[item.payload["connectorId"]] = item.payload["status"]
    return seen


async def wait_all_statuses(csms: Csms, mark: int, expected: dict[int, str]) -> None:
    await csms.wait_for(lambda: statuses_after(csms, mark) == expected)


async def test_missing_pong_is_noticed_and_the_agent_reconnects(
    make_agent: AgentFactory, csms: Csms, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    agent = await make_agent(
        url=url_of(relay.port), connectors=2, ocpp={"WebSocketPingInterval": 1}
    )
    await wait_all_statuses(csms, 0, {0: "Available", 1: "Available", 2: "Available"})
    await agent.wait_status(lambda s: s["csms"]["connected"])
    assert csms.connections == 1

    relay.freeze()
    # No pong comes back: the agent gives up on the connection by itself.
    await agent.wait_status(lambda s: not s["csms"]["connected"], timeout_s=15)
    assert alive(agent)
    closed = [r.getMessage() for r in caplog.records if r.name == "evcp.session"]
    assert any("keepalive ping timeout" in m for m in closed), closed
    # Meanwhile a car is plugged into connector 2 (the CSMS cannot hear about it yet).
    await agent.sim("plug", connector=2)
    await agent.wait_status(lambda s: s["connectors"][1]["status"] == "Preparing")

    mark = len(csms.received)
    relay.thaw()
    await csms.wait_for(lambda: csms.connections >= 2, timeout_s=15)
    await wait_all_statuses(csms, mark, {0: "Available", 1: "Available", 2: "Preparing"})
    await agent.wait_status(lambda s: s["csms"]["connected"])
    assert relay.accepted >= 2
    assert len(csms.messages("BootNotification")) == 1
    assert csms.errors == []


async def test_dropped_connection_resends_every_connector_status(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent = await make_agent(connectors=2)
    await wait_all_statuses(csms, 0, {0: "Available", 1: "Available", 2: "Available"})
    await agent.sim("plug", connector=2)
    await csms.wait_message("StatusNotification", status_is(2, "Preparing"))

    mark = len(csms.received)
    await csms.disconnect(CP_ID)
    await csms.wait_for(lambda: csms.connections == 2)
    await wait_all_statuses(csms, mark, {0: "Available", 1: "Available", 2: "Preparing"})
    await agent.wait_status(lambda s: s["csms"]["connected"])
    assert len(csms.messages("BootNotification")) == 1
    assert csms.errors == []


async def test_agent_stops_even_if_the_connection_drops_at_that_moment(
    make_agent: AgentFactory, csms: Csms, relay: Relay
) -> None:
    """SIGTERM (systemctl stop) while the link to the CSMS drops: the agent still ends
    normally (app.run returns None: exit status 0), and removes its control socket."""
    agent = await make_agent(url=url_of(relay.port))
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    task = agent.task
    assert task is not None and not task.done() and agent.socket.exists()
    # Both at once: the agent handles the signal (in the event loop) while the link drops.
    signal.raise_signal(signal.SIGTERM)
    await asyncio.gather(relay.stop(), asyncio.wait_for(asyncio.shield(task), 30))
    assert task.done() and not task.cancelled()
    assert task.result() is None  # returned normally, not cancelled, no exception
    assert not agent.socket.exists()


async def test_a_call_many_tls_reads_long_arrives_whole_and_is_answered(
    booted: RunningAgent, csms: Csms
) -> None:
    """The agent reads TLS in TLS_READ_SIZE pieces (asyncio's default is 256 KiB): a CALL
    twenty times that size still arrives whole and is answered on the same connection."""
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_SIZE
    data = "0123456789" * (TLS_READ_SIZE * 2)
    result = await csms.call(
        CP_ID, call.DataTransfer(vendor_id="com.example", message_id="big", data=data)
    )
    assert result["status"] == "UnknownVendorId"
    result = await csms.call(CP_ID, call.ClearCache())
    assert result["status"] == "Accepted"
    assert csms.errors == []
    assert (await booted.status())["csms"]["connected"] is True
