"""Link state from netlink (``pyroute2``): is the interface there, up, with carrier and an
address? One dump of links and addresses per call: cheap enough to poll a few times a second.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

__all__ = ["LinkEvents", "LinkInfo", "LinkMonitor", "read_links"]

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RT_SCOPE_UNIVERSE = 0


@dataclass(frozen=True, slots=True)
class LinkInfo:
    interface: str
    exists: bool = False
    up: bool = False
    carrier: bool = False
    addresses: tuple[str, ...] = ()
    index: int = 0

    @property
    def usable(self) -> bool:
        """Up, with carrier and at least one global address."""
        return self.exists and self.up and self.carrier and bool(self.addresses)

    @property
    def why_not(self) -> str:
        """Why the link is not usable ("" when it is)."""
        if not self.exists:
            return f"interface {self.interface} does not exist"
        if not self.up:
            return f"{self.interface} is administratively down"
        if not self.carrier:
            return f"{self.interface} has no carrier"
        if not self.addresses:
            return f"{self.interface} has no address"
        return ""


async def read_links(interfaces: Iterable[str]) -> dict[str, LinkInfo]:
    """The state of each named interface (a missing one has ``exists=False``); opens and
    closes a netlink socket. :class:`LinkMonitor` keeps one open for polling."""
    async with AsyncIPRoute() as ipr:
        return await _read(ipr, interfaces)


class LinkMonitor:
    """Reads link state over one netlink socket kept open (reopened after an error)."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None

    async def read(self, interfaces: Iterable[str]) -> dict[str, LinkInfo]:
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        try:
            return await _read(self._ipr, interfaces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


class LinkEvents:
    """Wakes up on any link or address change (the kernel's netlink multicast groups), so
    that a carrier loss is seen at once without polling."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None

    async def open(self) -> None:
        ipr = AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr

    async def next(self) -> None:
        """Return once at least one change has been announced."""
        assert self._ipr is not None, "open() first"
        async for _msg in self._ipr.get():
            pass

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


async def _read(ipr: AsyncIPRoute, interfaces: Iterable[str]) -> dict[str, LinkInfo]:
    wanted = set(interfaces)
    found: dict[int, tuple[str, int]] = {}
    addresses: dict[int, list[str]] = {}
    async for msg in await ipr.link("dump"):
        name = msg.get("ifname")
        if name in wanted:
            flags = int(msg.get("flags") or 0)
            carrier = msg.get("carrier")
            lower = bool(flags & IFF_LOWER_UP) if carrier is None else bool(carrier)
            found[int(msg["index"])] = (name, (flags & IFF_UP) | (IFF_LOWER_UP if lower else 0))
    async for msg in await ipr.addr("dump"):
        index = int(msg["index"])
        if index not in found:
            continue
        flags = int(msg.get("flags") or 0)
        if msg.get("scope") != RT_SCOPE_UNIVERSE or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            continue
        if msg.get("family") not in (socket.AF_INET, socket.AF_INET6):
            continue
        addresses.setdefault(index, []).append(str(msg.get("address")))
    result = {name: LinkInfo(name) for name in wanted}
    for index, (name, bits) in found.items():
        result[name] = LinkInfo(
            interface=name,
            exists=True,
            up=bool(bits & IFF_UP),
            carrier=bool(bits & IFF_LOWER_UP),
            addresses=tuple(addresses.get(index, ())),
            index=index,
        )
    return result
