"""A probe of one link: a TCP connect (and optionally a TLS handshake) to the CSMS from a
socket bound to that interface (``SO_BINDTODEVICE``), so the answer is about that link
whatever the default route says.

Binding to a device needs CAP_NET_RAW on kernels before 5.7 (and none since). The host name
is resolved through the system resolver and kept for ``dns_ttl_s`` (DNS queries cost GSM
data too); a failed resolution falls back to the last address known.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from dataclasses import dataclass

__all__ = ["ProbeResult", "Prober"]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str  # "" when ok, else why (e.g. "connect timed out after 1.5 s")
    elapsed_s: float


class Prober:
    """Probes ``host:port`` over a given interface."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 1.5,
        tls: ssl.SSLContext | None = None,
        dns_ttl_s: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.tls = tls
        self.dns_ttl_s = dns_ttl_s
        self._resolved: tuple[float, list[tuple[int, tuple[str, int]]]] | None = None

    async def _addresses(self) -> list[tuple[int, tuple[str, int]]]:
        now = time.monotonic()
        if self._resolved is not None and now - self._resolved[0] < self.dns_ttl_s:
            return self._resolved[1]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            if self._resolved is not None:
                return self._resolved[1]
            raise
        found: list[tuple[int, tuple[str, int]]] = [
            (int(family), (str(addr[0]), int(addr[1]))) for family, _, _, _, addr in infos
        ]
        self._resolved = (now, found)
        return found

    async def probe(self, interface: str) -> ProbeResult:
        """Connect (and handshake) over ``interface``; never raises."""
        start = time.monotonic()
        try:
            addresses = await self._addresses()
        except (OSError, TimeoutError) as exc:
            return ProbeResult(False, f"cannot resolve {self.host}: {exc}", 0.0)
        detail = "no address"
        for family, address in addresses:
            stage = ["connect"]
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._connect(interface, family, address, stage)
                return ProbeResult(True, "", time.monotonic() - start)
            except TimeoutError:
                detail = f"{stage[0]} timed out after {self.timeout_s:g} s"
            except ssl.SSLError as exc:
                detail = f"TLS handshake failed: {exc.reason or exc}"
            except OSError as exc:
                detail = os.strerror(exc.errno) if exc.errno else str(exc)
        return ProbeResult(False, detail, time.monotonic() - start)

    async def _connect(
        self, interface: str, family: int, address: tuple[str, int], stage: list[str]
    ) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            if self.tls is None:
                return
            stage[0] = "TLS handshake"
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=self.tls, server_hostname=self.host
            )
            sock = None  # type: ignore[assignment]  # the transport owns it now
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            del reader
        finally:
            if sock is not None:
                sock.close()
