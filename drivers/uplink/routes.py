"""The ``route`` back-end: make the chosen link's own default route win.

Each uplink keeps the default route the OS gave it (DHCP: e.g. wifi0 metric 600, gsm0
metric 700). To make one win, this back-end adds a *copy* of that link's default route --
same gateway, same interface -- with metric :data:`WIN_METRIC` and protocol
:data:`EVCP_PROTO`, and removes its copy on the other links. It never invents a gateway and
never touches the routes it did not make, so DHCP renewals do not fight it; removing the
copies (:meth:`RouteBackend.release`, or after a crash at the next start) gives the OS's
choice back. IPv4 replaces atomically (same table, destination and metric); IPv6 copies are
added before the old one is removed.

Needs CAP_NET_ADMIN. Without it every change fails with EPERM: :class:`BackendError`.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from drivers.uplink import BackendError

__all__ = ["EVCP_PROTO", "WIN_METRIC", "RouteBackend", "default_routes"]

#: rtm_protocol of the routes evcp adds (free in /etc/iproute2/rt_protos; shown as "proto 211").
EVCP_PROTO = 211
#: The metric of the copy: below any DHCP metric (NetworkManager and dhcpcd use 100+).
WIN_METRIC = 10
MAIN_TABLE = 254
RTN_UNICAST = 1


async def default_routes(ipr: Any, family: int) -> list[Any]:
    """Unicast default routes of the main table for one address family."""
    found = []
    async for msg in await ipr.route("dump", family=family):
        if (
            msg.get("dst_len") == 0
            and msg.get("table") == MAIN_TABLE
            and msg["type"] == RTN_UNICAST
            and msg.get("oif")
        ):
            found.append(msg)
    return found


def _denied(exc: NetlinkError) -> BackendError:
    if exc.code == errno.EPERM:
        return BackendError(
            "route back-end: changing routes needs CAP_NET_ADMIN (add it to the unit's"
            " AmbientCapabilities= and CapabilityBoundingSet=); the default route is left"
            " as the OS set it"
        )
    return BackendError(f"route back-end: netlink error {exc.code}: {exc}")


class RouteBackend:
    """Makes one interface's existing default route win by a lower metric."""

    name = "route"

    async def apply(self, interface: str) -> None:
        """Make ``interface``'s default route the one the kernel uses. Idempotent."""
        try:
            async with AsyncIPRoute() as ipr:
                index = await self._index(ipr, interface)
                copied = 0
                for family in (socket.AF_INET, socket.AF_INET6):
                    copied += await self._apply_family(ipr, family, index, interface)
                if copied == 0:
                    raise BackendError(
                        f"route back-end: {interface} has no default route of its own"
                        " (the OS or DHCP must give each uplink one); routes left as they are"
                    )
        except NetlinkError as exc:
            raise _denied(exc) from None

    async def release(self) -> None:
        """Remove every route this back-end added (the OS's choice applies again)."""
        try:
            async with AsyncIPRoute() as ipr:
                for family in (socket.AF_INET, socket.AF_INET6):
                    for route in await default_routes(ipr, family):
                        if route.get("proto") == EVCP_PROTO:
                            await self._delete(ipr, route)
        except NetlinkError as exc:
            raise _denied(exc) from None

    @staticmethod
    async def _index(ipr: Any, interface: str) -> int:
        found = None
        async for msg in await ipr.link("dump"):  # read to the end: a dump left half-read
            if msg.get("ifname") == interface:  # makes the next request fail with EBUSY
                found = int(msg["index"])
        if found is not None:
            return found
        raise BackendError(f"route back-end: no interface named {interface}")

    async def _apply_family(self, ipr: Any, family: int, index: int, interface: str) -> int:
        routes = await default_routes(ipr, family)
        theirs = [r for r in routes if r.get("proto") != EVCP_PROTO]
        ours = [r for r in routes if r.get("proto") == EVCP_PROTO]
        source = [r for r in theirs if r.get("oif") == index]
        if not source:
            for route in ours:  # a stale copy would keep a dead link winning
                await self._delete(ipr, route)
            return 0
        blocking = [
            r for r in theirs if r.get("oif") != index and (r.get("priority") or 0) <= WIN_METRIC
        ]
        if blocking:
            raise BackendError(
                f"route back-end: another default route has metric"
                f" {blocking[0].get('priority') or 0} <= {WIN_METRIC} and always wins; give"
                f" each uplink's default route a metric above {WIN_METRIC}"
            )
        best = min(source, key=lambda r: r.get("priority") or 0)
        spec: dict[str, Any] = {
            "family": family,
            "dst_len": 0,
            "table": MAIN_TABLE,
            "oif": index,
            "priority": WIN_METRIC,
            "proto": EVCP_PROTO,
        }
        if best.get("gateway"):
            spec["gateway"] = best.get("gateway")
        await ipr.route("replace", **spec)
        for route in ours:
            if route.get("oif") != index:
                await self._delete(ipr, route)
        return 1

    @staticmethod
    async def _delete(ipr: Any, route: Any) -> None:
        spec: dict[str, Any] = {
            "family": route["family"],
            "dst_len": 0,
            "table": MAIN_TABLE,
            "oif": route.get("oif"),
            "priority": route.get("priority") or 0,
            "proto": EVCP_PROTO,
        }
        if route.get("gateway"):
            spec["gateway"] = route.get("gateway")
        try:
            await ipr.route("del", **spec)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:  # already gone
                raise
