"""Uplink drivers on real parts: the probe against a real TLS server on 127.0.0.1 from a
socket bound to ``lo``; netlink state of ``lo``; the networkmanager back-end without a
D-Bus system bus (one clear error)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from drivers.uplink import BackendError
from drivers.uplink.netlink import read_links
from drivers.uplink.networkmanager import NetworkManagerBackend
from drivers.uplink.probe import Prober


@pytest.fixture
async def tls_port(ca: trustme.CA) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_tls_probe_succeeds_over_the_bound_interface(ca: trustme.CA, tls_port: int) -> None:
    result = await Prober("127.0.0.1", tls_port, tls=client_ctx(ca)).probe("lo")
    assert result.ok, result


async def test_tls_probe_fails_on_an_untrusted_certificate(tls_port: int) -> None:
    result = await Prober("127.0.0.1", tls_port, tls=client_ctx(trustme.CA())).probe("lo")
    assert not result.ok
    assert result.detail.startswith("TLS handshake failed: CERTIFICATE_VERIFY_FAILED")


async def test_probe_on_a_refused_port_and_a_missing_interface() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        refused = await Prober("127.0.0.1", port).probe("lo")
        missing = await Prober("127.0.0.1", port).probe("nosuch0")
    assert (refused.ok, refused.detail) == (False, "Connection refused")
    assert not missing.ok and missing.detail == "No such device"


async def test_probe_of_an_unresolvable_host_says_so() -> None:
    result = await Prober("no-such-host.invalid", 443, timeout_s=2).probe("lo")
    assert not result.ok
    assert result.detail.startswith("cannot resolve no-such-host.invalid")


async def test_netlink_reports_lo_and_a_missing_interface() -> None:
    links = await read_links(["lo", "nosuch0"])
    assert links["lo"].exists and links["lo"].up and links["lo"].index == 1
    assert not links["lo"].usable  # loopback addresses are host scope: not an uplink
    assert not links["nosuch0"].exists
    assert links["nosuch0"].why_not == "interface nosuch0 does not exist"


async def test_networkmanager_without_dbus_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/evcp-test-bus")
    with pytest.raises(BackendError, match="cannot reach the D-Bus system bus"):
        await NetworkManagerBackend(["wifi0", "gsm0"]).apply("wifi0")


async def test_a_server_that_never_answers_tls_is_a_handshake_timeout(ca: trustme.CA) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts TCP, never says a word

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await Prober("127.0.0.1", port, timeout_s=0.3, tls=client_ctx(ca)).probe("lo")
        plain = await Prober("127.0.0.1", port, timeout_s=0.3).probe("lo")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert (result.ok, result.detail) == (False, "TLS handshake timed out after 0.3 s")
    assert plain.ok  # a TCP-only probe is content with the connect
