"""Real network namespaces for the uplink tests and benchmark (reusable: the OCPP-over-a-
switch test runs the test CSMS in :attr:`Topology.csms` and the agent in
:attr:`Topology.charger`).

    charger                 router-wifi               csms
    wifi0 10.1.0.2 ---- lan 10.1.0.1 wan 10.11.0.1 ---- w 10.11.0.2
    gsm0  10.2.0.2 ---- lan 10.2.0.1 wan 10.12.0.1 ---- g 10.12.0.2    lo: 10.99.0.1
                            router-gsm

The charger has two default routes, as DHCP would leave them: via wifi0 metric 600 and via
gsm0 metric 700. The CSMS address is :data:`CSMS_ADDR` on the csms namespace's loopback.
Faults: :meth:`Topology.carrier` (the router's side of the veth goes down: the charger's
interface loses its carrier), :meth:`Topology.blackhole` (the router silently drops what is
meant for the CSMS: carrier fine, no way through).

Every namespace name carries a per-run prefix, and :meth:`Topology.down` deletes them by
name (also when :meth:`Topology.up` fails half-way).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

CSMS_ADDR = "10.99.0.1"
ROOT = Path(__file__).resolve().parents[2]

LINKS = {
    # link: (charger interface, charger address, router address, upstream subnet, metric)
    "wifi": ("wifi0", "10.1.0.2", "10.1.0.1", "10.11.0", 600),
    "gsm": ("gsm0", "10.2.0.2", "10.2.0.1", "10.12.0", 700),
}


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be created here (None: they can)."""
    name = f"evcp-probe-{secrets.token_hex(4)}"
    try:
        result = run("ip", "netns", "add", name, check=False)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    run("ip", "netns", "del", name, check=False)
    return None


class Topology:
    def __init__(self) -> None:
        prefix = f"evcp{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.charger = f"{prefix}-charger"
        self.routers = {"wifi": f"{prefix}-rwifi", "gsm": f"{prefix}-rgsm"}
        self.csms = f"{prefix}-csms"
        self.names = [self.charger, *self.routers.values(), self.csms]

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", ns, *args, check=check)

    def up(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for name in self.names:
            run("ip", "netns", "add", name)
            self.ip(name, "link", "set", "lo", "up")
        self.ip(self.csms, "addr", "add", f"{CSMS_ADDR}/32", "dev", "lo")
        for link, (ifname, addr, gw, upstream, metric) in LINKS.items():
            router = self.routers[link]
            csms_if = link[0]  # "w" / "g"
            self.ip(self.charger, "link", "add", ifname, "type", "veth", "peer", "name", "lan",
                    "netns", router)  # fmt: skip
            self.ip(router, "link", "add", "wan", "type", "veth", "peer", "name", csms_if,
                    "netns", self.csms)  # fmt: skip
            self.ip(self.charger, "addr", "add", f"{addr}/24", "dev", ifname)
            self.ip(router, "addr", "add", f"{gw}/24", "dev", "lan")
            self.ip(router, "addr", "add", f"{upstream}.1/24", "dev", "wan")
            self.ip(self.csms, "addr", "add", f"{upstream}.2/24", "dev", csms_if)
            for ns, dev in ((self.charger, ifname), (router, "lan"), (router, "wan"),
                            (self.csms, csms_if)):  # fmt: skip
                self.ip(ns, "link", "set", dev, "up")
            run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.ip(router, "route", "add", "default", "via", f"{upstream}.2")
            self.ip(self.csms, "route", "add", f"{addr.rsplit('.', 1)[0]}.0/24", "via",
                    f"{upstream}.1")  # fmt: skip
            self.ip(self.charger, "route", "add", "default", "via", gw, "dev", ifname,
                    "metric", str(metric))  # fmt: skip

    def down(self) -> None:
        for name in self.names:
            run("ip", "netns", "del", name, check=False)

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---------------------------------------------------------------- faults

    def carrier(self, link: str, on: bool) -> None:
        """The router's side of the link goes down (or up): the charger loses carrier."""
        self.ip(self.routers[link], "link", "set", "lan", "up" if on else "down")

    def blackhole(self, link: str, on: bool) -> None:
        """The router silently drops everything meant for the CSMS (carrier stays)."""
        verb = "add" if on else "del"
        self.ip(self.routers[link], "route", verb, "blackhole", f"{CSMS_ADDR}/32")

    # ---------------------------------------------------------------- observations

    def route_dev(self, dst: str = CSMS_ADDR) -> str:
        """The interface the charger's kernel picks for ``dst`` now."""
        out = self.ip(self.charger, "route", "get", dst).stdout
        match = re.search(r"\bdev (\S+)", out)
        assert match, out
        return match.group(1)

    def default_routes(self) -> list[dict[str, object]]:
        out = self.ip(self.charger, "-j", "route", "show", "default").stdout
        routes: list[dict[str, object]] = json.loads(out or "[]")
        return routes

    def byte_counters(self, ns: str, ifname: str) -> int:
        """rx + tx bytes of an interface (what a GSM operator bills, IP and below)."""
        out = self.ip(ns, "-j", "-s", "link", "show", ifname).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.exec_argv(ns, argv), cwd=ROOT, **kwargs)  # type: ignore[call-overload, no-any-return]


TLS_SERVER = """
import asyncio, ssl, sys
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
async def handle(reader, writer):
    try:
        await reader.read(1)
    except Exception:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), ssl=ctx)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def start_tls_server(
    topo: Topology, cert: Path, key: Path, port: int = 8443
) -> subprocess.Popen[bytes]:
    """A TLS server on CSMS_ADDR:port in the csms namespace (accepts and closes). Stop it
    with ``proc.terminate()`` (by its PID)."""
    proc = topo.popen(
        topo.csms,
        [sys.executable, "-c", TLS_SERVER, CSMS_ADDR, str(port), str(cert), str(key)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError("the TLS server in the csms namespace did not start")
    return proc


CLONE_NEWNET = 0x40000000


def socket_in_netns(
    ns: str, host: str, port: int, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` *inside* namespace ``ns``, usable from
    this process. A namespace is per thread on Linux: a short-lived thread enters ``ns``,
    makes the socket and exits; the socket stays in ``ns``. This lets an in-process server
    -- the test CSMS (websockets ``serve(sock=...)``), asyncio ``start_server(sock=...)`` --
    answer the agent running in the charger namespace, with the test asserting on it
    directly."""
    result: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
            sock.setblocking(False)
            result.append(sock)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=enter, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
