"""The WSS connection to the CSMS: TLS context, Basic Auth, reconnect policy.

WSS only (OCPP security profile 2): TLS 1.2 or newer, the server certificate and host name
verified against ``ca_file`` (or the system store), and HTTP Basic Auth with
user = charge point id and password = AuthorizationKey, sent as an explicit header so the
URL stays safe to log. The reconnect delays come from :func:`backoff`, a pure generator.
"""

from __future__ import annotations

import asyncio.sslproto
import base64
import logging
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from agent.core.security import EventType

log = logging.getLogger("evcp.transport")

SUBPROTOCOL = "ocpp1.6"

#: How much asyncio's TLS transport reads at a time. Its default, 256 KiB, is a buffer every
#: TLS connection allocates and fills with zeros (resident memory, 0.7 % of the agent's
#: budget) and the size of every read asked of OpenSSL. OCPP messages are a few kB; 32 KiB
#: holds a full TLS record (16 KiB) with room to spare, and a larger message takes more reads.
TLS_READ_SIZE = 32 * 1024


def _smaller_tls_reads() -> None:
    """Set asyncio's TLS read size (a class attribute, the same for every connection the
    process makes) to :data:`TLS_READ_SIZE`, only where it is still the 256 KiB we know."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if getattr(protocol, "max_size", None) == 256 * 1024:
        protocol.max_size = TLS_READ_SIZE  # type: ignore[union-attr]


_smaller_tls_reads()


def max_frame_bytes(send_local_list_max_length: int) -> int:
    """The largest WebSocket message read (websockets' ``max_size``, in bytes): four times
    the pre-check's frame limit (:func:`agent.ocpp.precheck.frame_limit`, in characters).

    A frame between the two is read and answered with a FormationViolation CALLERROR that
    names the limit (UTF-8 takes up to 3 bytes a character, so every frame within the
    limit is read whatever its characters); beyond it websockets closes the connection
    (1009), which bounds the memory one message can take.
    """
    # (Imported here: the pre-check loads the ocpp library, which the CLI's commands
    # that import this module for its TLS settings must not pay for.)
    from agent.ocpp.precheck import frame_limit

    return 4 * frame_limit(send_local_list_max_length)


#: TLS 1.2 suites, in preference order: ECDHE with AES-GCM first, then ECDHE with CBC and
#: SHA-2, then the two RSA-kx GCM suites the OCPP security whitepaper mandates. Every one is
#: in the ELBSecurityPolicy-TLS-1-2-Ext-2018-06 set, so a handshake with a server limited to
#: that policy always finds a common suite. SHA-1 CBC suites are left out on purpose.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-RSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-RSA-AES256-SHA384",
        "AES128-GCM-SHA256",
        "AES256-GCM-SHA384",
    )
)


def tls_context(
    ca_file: str | None,
    client_cert: str | None = None,
    client_key: str | None = None,
    extra_ca_file: str | None = None,
) -> ssl.SSLContext:
    """Client TLS context: TLS >= 1.2, our cipher list, certificate and host name checked.

    TLS 1.3 stays enabled (with OpenSSL's default TLS 1.3 suites) for servers that offer it.
    ``client_cert`` (PEM, the chain after the leaf) and ``client_key`` are the charge
    point's certificate for security profile 3. ``extra_ca_file`` adds CSMS roots (those
    installed with InstallCertificate) to ``ca_file`` or the system store.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    if extra_ca_file:
        ctx.load_verify_locations(cafile=extra_ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if client_cert:
        ctx.load_cert_chain(client_cert, client_key or None)
    return ctx


def basic_auth_header(charge_point_id: str, password: str) -> str:
    token = base64.b64encode(f"{charge_point_id}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def endpoint(url: str, charge_point_id: str) -> str:
    """The CSMS URL with ``/<charge_point_id>`` appended (percent-encoded)."""
    return url.rstrip("/") + "/" + quote(charge_point_id, safe="")


def backoff(
    *, initial_s: float, maximum_s: float, factor: float = 2.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Yield reconnect delays: exponential growth, capped, with jitter.

    Each delay is drawn uniformly from [d/2, d] where d = initial_s * factor**n capped at
    maximum_s, so that a fleet of chargers that lost the CSMS at once does not reconnect
    in lock-step. Pure: pass ``rng`` to make it deterministic in tests.
    """
    rand = rng or random.Random()
    delay = initial_s
    while True:
        yield rand.uniform(delay / 2, delay)
        delay = min(maximum_s, delay * factor)


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """Why a connection attempt failed, for the log and ``evcp status``."""

    kind: str  # "auth", "tls", "http", "network", "protocol"
    detail: str


def classify(exc: BaseException) -> ConnectFailure:
    """Sort a connect error into a kind with a one-line explanation (all are retried)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            return ConnectFailure(
                "auth", f"CSMS refused the credentials (HTTP {status}): check the password"
            )
        return ConnectFailure("http", f"CSMS answered HTTP {status} to the WebSocket upgrade")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectFailure("tls", f"server certificate rejected: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return ConnectFailure("tls", f"TLS handshake failed: {exc.reason or exc}")
    if isinstance(exc, InvalidHandshake):
        return ConnectFailure("protocol", f"WebSocket handshake failed: {exc}")
    if isinstance(exc, TimeoutError):
        return ConnectFailure("network", "timed out while connecting")
    if isinstance(exc, ConnectionResetError) and exc.errno is None and not exc.args:
        # asyncio's signature of an EOF in the middle of the TLS handshake: the server read
        # our ClientHello and hung up, typically because it offers no TLS version or cipher
        # suite we accept (e.g. a TLS 1.1-only server) and did not even send an alert.
        return ConnectFailure(
            "tls",
            "TLS handshake failed: the server closed the connection (does it offer TLS 1.2"
            " or newer with a cipher suite we accept?)",
        )
    if isinstance(exc, OSError):
        return ConnectFailure("network", exc.strerror or str(exc) or type(exc).__name__)
    return ConnectFailure("protocol", f"{type(exc).__name__}: {exc}")


#: OpenSSL reasons meaning the server wants another TLS version than ours.
_VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "WRONG_VERSION_NUMBER",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "UNKNOWN_PROTOCOL",
    }
)
#: ... that no cipher suite is common.
_CIPHER_REASONS = frozenset({"NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "NO_CIPHER_MATCH"})
#: ... that the server refused our client certificate (or wanted one we did not send).
_CLIENT_CERT_REASONS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it (websockets wraps TLS errors met during the upgrade)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def security_event(exc: BaseException, *, client_cert: bool) -> EventType | None:
    """The OCPP security event a connect error stands for, or None (a network error).

    ``client_cert``: the attempt presented a client certificate (security profile 3),
    so a TLS handshake-failure alert means the server refused it rather than our suites.
    """
    for cause in _causes(exc):
        if isinstance(cause, InvalidStatus):
            if cause.response.status_code in (401, 403):
                return EventType.FAILED_TO_AUTHENTICATE_AT_CSMS
            return None
        if isinstance(cause, ssl.SSLCertVerificationError):
            return EventType.INVALID_CENTRAL_SYSTEM_CERTIFICATE
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or ""
            if reason in _VERSION_REASONS:
                return EventType.INVALID_TLS_VERSION
            if reason in _CIPHER_REASONS:
                return EventType.INVALID_TLS_CIPHER_SUITE
            if reason in _CLIENT_CERT_REASONS:
                return EventType.FAILED_TO_AUTHENTICATE_AT_CSMS
            if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
                return (
                    EventType.FAILED_TO_AUTHENTICATE_AT_CSMS
                    if client_cert
                    else EventType.INVALID_TLS_CIPHER_SUITE
                )
            return None
        if isinstance(cause, EOFError) and "HTTP status line" in str(cause):
            # The TLS handshake completed and the server hung up before answering the
            # upgrade request: how a client certificate refused (or missing) under TLS 1.3
            # looks, as asyncio does not surface the post-handshake alert.
            return EventType.FAILED_TO_AUTHENTICATE_AT_CSMS
        if isinstance(cause, ConnectionResetError) and cause.errno is None and not cause.args:
            # EOF during the handshake (see classify): a server without TLS 1.2+ that
            # sends no alert (most often an old TLS version).
            return EventType.INVALID_TLS_VERSION
    return None


async def open_connection(
    *,
    url: str,
    charge_point_id: str,
    password: str | None,
    ssl_context: ssl.SSLContext,
    ping_interval_s: float,
    open_timeout_s: float = 20.0,
    proxy: str = "",
    max_size: int | None = None,
) -> ClientConnection:
    """Open the WSS connection; raise on failure (see :func:`classify`).

    WebSocket pings go every ``ping_interval_s`` seconds (0: none); a pong that does not
    come back within the same interval closes the connection, and the caller reconnects.
    ``proxy`` is an http(s):// HTTP CONNECT proxy, or empty to connect directly (proxy
    variables in the environment are ignored: a service's network path is its config).
    ``password`` None sends no Basic Auth (security profile 3: the client certificate is
    the credential). ``max_size``: see :func:`max_frame_bytes` (None: at the default
    SendLocalListMaxLength, 1000).
    """
    if urlsplit(url).scheme != "wss":
        raise ValueError("refusing a non-wss:// CSMS URL")
    interval = ping_interval_s if ping_interval_s > 0 else None
    ws = await connect(
        endpoint(url, charge_point_id),
        ssl=ssl_context,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers=(
            {"Authorization": basic_auth_header(charge_point_id, password)}
            if password is not None
            else {}
        ),
        ping_interval=interval,
        ping_timeout=interval,
        open_timeout=open_timeout_s,
        close_timeout=5,
        max_size=max_size if max_size is not None else max_frame_bytes(1000),
        user_agent_header=None,
        proxy=proxy or None,
    )
    if ws.subprotocol != SUBPROTOCOL:
        await ws.close()
        raise InvalidHandshake(f"CSMS did not accept subprotocol {SUBPROTOCOL}")
    return ws
