"""Pure unit tests of ``agent.ocpp.transport``: back-off, error classification, URL, auth."""

from __future__ import annotations

import base64
import errno
import json
import logging
import random
import ssl
from collections.abc import Iterator
from itertools import islice

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response

from agent import logs
from agent.ocpp import transport
from agent.ocpp.transport import backoff, basic_auth_header, classify, endpoint


# ---------------------------------------------------------------------- backoff
def _nominal(initial: float, maximum: float, factor: float, n: int) -> list[float]:
    """The un-jittered delays d_0, d_1, ...: initial * factor**k capped at maximum."""
    out, d = [], initial
    for _ in range(n):
        out.append(d)
        d = min(maximum, d * factor)
    return out


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_backoff_is_deterministic_with_a_seeded_rng(seed: int) -> None:
    first = list(islice(backoff(initial_s=1, maximum_s=60, rng=random.Random(seed)), 30))
    second = list(islice(backoff(initial_s=1, maximum_s=60, rng=random.Random(seed)), 30))
    assert first == second


@pytest.mark.parametrize(("initial", "maximum", "factor"), [(1, 300, 2), (0.1, 0.5, 2), (5, 5, 3)])
@pytest.mark.parametrize("seed", range(5))
def test_backoff_each_delay_is_jittered_within_half_to_full(
    initial: float, maximum: float, factor: float, seed: int
) -> None:
    n = 40
    delays = list(
        islice(
            backoff(initial_s=initial, maximum_s=maximum, factor=factor, rng=random.Random(seed)),
            n,
        )
    )
    for delay, nominal in zip(delays, _nominal(initial, maximum, factor, n), strict=True):
        assert nominal / 2 <= delay <= nominal
        assert delay <= maximum


def test_backoff_grows_then_stays_capped() -> None:
    # Without jitter (an rng that always picks the upper bound) the sequence is exact.
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    delays = list(islice(backoff(initial_s=1, maximum_s=300, rng=Top()), 12))
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_backoff_grows_on_average_and_never_exceeds_the_cap() -> None:
    delays = list(islice(backoff(initial_s=1, maximum_s=60, rng=random.Random(7)), 200))
    # Early delays are short, late ones are near the cap (jitter only halves at worst).
    assert max(delays[:3]) <= 4
    assert all(30 <= d <= 60 for d in delays[10:])
    assert max(delays) <= 60


def test_backoff_without_rng_still_respects_bounds() -> None:
    delays = list(islice(backoff(initial_s=0.1, maximum_s=0.5), 50))
    for delay, nominal in zip(delays, _nominal(0.1, 0.5, 2.0, 50), strict=True):
        assert nominal / 2 <= delay <= nominal


# ---------------------------------------------------------------------- classify
def _invalid_status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", Headers(), b""))


@pytest.mark.parametrize("code", [401, 403])
def test_classify_auth_refusal(code: int) -> None:
    failure = classify(_invalid_status(code))
    assert failure.kind == "auth"
    assert str(code) in failure.detail
    assert "password" in failure.detail


@pytest.mark.parametrize("code", [404, 500, 503])
def test_classify_other_http_status(code: int) -> None:
    failure = classify(_invalid_status(code))
    assert failure.kind == "http"
    assert str(code) in failure.detail


def test_classify_certificate_verification_error() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "unable to get local issuer certificate"
    failure = classify(exc)
    assert failure.kind == "tls"
    assert "certificate" in failure.detail
    assert "unable to get local issuer certificate" in failure.detail


def test_classify_other_ssl_error() -> None:
    exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] alert protocol version")
    exc.reason = "TLSV1_ALERT_PROTOCOL_VERSION"
    failure = classify(exc)
    assert failure.kind == "tls"
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in failure.detail


def test_classify_connection_refused() -> None:
    failure = classify(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert failure.kind == "network"
    assert failure.detail == "Connection refused"


def test_classify_oserror_without_strerror() -> None:
    failure = classify(OSError("Multiple exceptions: [Errno 111] refused, [Errno 99] x"))
    assert failure.kind == "network"
    assert "Multiple exceptions" in failure.detail


def test_classify_eof_during_tls_handshake_is_a_tls_failure() -> None:
    # asyncio raises a bare ConnectionResetError when the server hangs up mid-handshake
    # (e.g. a TLS 1.1-only server that sends no alert): that is a TLS problem, not a blank.
    failure = classify(ConnectionResetError())
    assert failure.kind == "tls"
    assert "TLS 1.2" in failure.detail


def test_classify_reset_with_errno_is_a_network_failure() -> None:
    failure = classify(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert failure.kind == "network"
    assert failure.detail == "Connection reset by peer"


def test_classify_never_gives_an_empty_detail() -> None:
    for exc in (OSError(), ConnectionAbortedError(), BrokenPipeError(), RuntimeError()):
        assert classify(exc).detail, exc


def test_classify_timeout() -> None:
    failure = classify(TimeoutError())
    assert failure.kind == "network"
    assert "timed out" in failure.detail


def test_classify_handshake_and_unknown_errors() -> None:
    assert classify(InvalidHandshake("no subprotocol")).kind == "protocol"
    other = classify(RuntimeError("boom"))
    assert other.kind == "protocol"
    assert "RuntimeError" in other.detail
    assert "boom" in other.detail


# ---------------------------------------------------------------------- endpoint / auth
@pytest.mark.parametrize(
    ("url", "cp_id", "expected"),
    [
        ("wss://csms.example.com/ocpp", "CP-1", "wss://csms.example.com/ocpp/CP-1"),
        ("wss://csms.example.com/ocpp/", "CP-1", "wss://csms.example.com/ocpp/CP-1"),
        ("wss://csms.example.com", "CP-1", "wss://csms.example.com/CP-1"),
        ("wss://h:8443/a/b", "CP:1@x", "wss://h:8443/a/b/CP%3A1%40x"),
        ("wss://h/ocpp", "a b/c%d", "wss://h/ocpp/a%20b%2Fc%25d"),
        ("wss://h/ocpp", "x_y.z~w-1", "wss://h/ocpp/x_y.z~w-1"),
    ],
)
def test_endpoint_appends_the_percent_encoded_id(url: str, cp_id: str, expected: str) -> None:
    assert endpoint(url, cp_id) == expected


def test_basic_auth_header_round_trips() -> None:
    header = basic_auth_header("CP-1", "s3cret:with:colons-and-é")
    scheme, _, token = header.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == "CP-1:s3cret:with:colons-and-é"


def test_basic_auth_header_known_value() -> None:
    # RFC 7617 example.
    assert basic_auth_header("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


# ---------------------------------------------------------------------- TLS context
def test_tls_context_requires_tls12_and_verifies_the_server() -> None:
    ctx = transport.tls_context(None)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    # ECDHE + AES-GCM are preferred over everything else.
    assert tls12[:4] and all(n.startswith("ECDHE-") and "GCM" in n for n in tls12[:4])
    assert not any(n.endswith("-SHA") for n in tls12), "no SHA-1 CBC suites"


async def test_open_connection_refuses_plain_ws() -> None:
    with pytest.raises(ValueError, match="wss"):
        await transport.open_connection(
            url="ws://127.0.0.1:1/ocpp",
            charge_point_id="CP",
            password="x" * 16,
            ssl_context=transport.tls_context(None),
            ping_interval_s=0,
        )


# ---------------------------------------------------------------------- log redaction
# The transport's secrets (Basic Auth password, AuthorizationKey) must never reach a log
# line, whichever library logs them and whichever handler writes the record.
@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Records as a foreign handler (not evcp's) receives them."""
    logs.install()
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    logger = logging.getLogger("test.redaction")
    handler = Keep(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield got
    finally:
        logger.removeHandler(handler)


def _text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(message)s")
    return "\n".join(formatter.format(r) for r in records)


def test_known_secret_is_redacted_for_any_handler(records: list[logging.LogRecord]) -> None:
    logs.add_secret("unit-secret-password-0001")
    log = logging.getLogger("test.redaction")
    log.info("password is %s", "unit-secret-password-0001")
    try:
        raise ValueError("boom unit-secret-password-0001")
    except ValueError:
        log.exception("failed")
    text = _text(records)
    assert "unit-secret-password-0001" not in text
    assert "<redacted>" in text
    assert "boom" in text  # the traceback is kept, only the secret is masked


@pytest.mark.parametrize(
    "payload",
    [
        {"key": "AuthorizationKey", "value": "never-seen-key-0002"},
        {"value": "never-seen-key-0002", "key": "AuthorizationKey"},
    ],
)
def test_authorization_key_in_a_frame_is_masked_in_any_order(
    records: list[logging.LogRecord], payload: dict[str, str]
) -> None:
    frame = json.dumps([2, "42", "ChangeConfiguration", payload])
    logging.getLogger("test.redaction").debug("< %s", frame)
    text = _text(records)
    assert "never-seen-key-0002" not in text
    assert "ChangeConfiguration" in text


def test_other_configuration_values_are_not_masked(records: list[logging.LogRecord]) -> None:
    frame = json.dumps([2, "1", "ChangeConfiguration", {"key": "HeartbeatInterval", "value": "30"}])
    logging.getLogger("test.redaction").debug("< %s", frame)
    assert _text(records).endswith('"value": "30"}]')


def test_basic_auth_header_is_masked(records: list[logging.LogRecord]) -> None:
    header = basic_auth_header("CP-1", "header-password-0003")
    logging.getLogger("test.redaction").debug("> %s: %s", "Authorization", header)
    text = _text(records)
    assert header.split()[1] not in text
    assert "Authorization" in text


def test_websockets_data_frames_are_reduced_to_their_size(
    records: list[logging.LogRecord],
) -> None:
    # websockets shows the start and end of a frame: a key at the end would leak in part.
    data = json.dumps([2, "x" * 36, "ChangeConfiguration", {"key": "AuthorizationKey",
                                                            "value": "tail-leak-key-0004"}])  # fmt: skip
    log = logging.getLogger("test.redaction")
    log.debug("< %s", Frame(Opcode.TEXT, data.encode()))
    log.debug("> %s", Frame(Opcode.PING, b"ping"))
    text = _text(records)
    assert "leak-key" not in text
    assert f"TEXT [{len(data)} bytes]" in text
    assert "PING" in text
