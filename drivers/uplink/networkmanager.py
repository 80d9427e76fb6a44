"""The ``networkmanager`` back-end, for boards that run NetworkManager: through its D-Bus
API (``dbus-fast``), the chosen device is activated if it is not, and its applied
connection is reapplied with ``ipv4.route-metric``/``ipv6.route-metric`` =
:data:`WIN_METRIC`; the other uplinks get -1 (NetworkManager's default per device type)
back. Nothing is written to the saved connection profiles.

With no ``dbus-fast`` or no system bus (or NetworkManager not running) every call is one
:class:`BackendError` saying so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from drivers.uplink import BackendError

__all__ = ["WIN_METRIC", "NetworkManagerBackend"]

WIN_METRIC = 10
NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DEVICE = "org.freedesktop.NetworkManager.Device"
#: NMDeviceState: ACTIVATED.
ACTIVATED = 100


class NetworkManagerBackend:
    name = "networkmanager"

    def __init__(self, interfaces: Iterable[str]) -> None:
        self.interfaces = tuple(interfaces)

    async def _bus(self) -> Any:
        try:
            from dbus_fast import BusType
            from dbus_fast.aio import MessageBus
        except ImportError:
            raise BackendError(
                "networkmanager back-end: the dbus-fast package is not installed"
            ) from None
        try:
            return await MessageBus(bus_type=BusType.SYSTEM).connect()
        except Exception as exc:  # dbus-fast raises OSError, AuthError, ValueError...
            raise BackendError(
                f"networkmanager back-end: cannot reach the D-Bus system bus ({exc});"
                ' is dbus running? Else use backend = "route"'
            ) from None

    @staticmethod
    async def _call(
        bus: Any, path: str, interface: str, member: str, signature: str = "", body: Any = ()
    ) -> list[Any]:
        from dbus_fast import Message, MessageType

        reply = await bus.call(
            Message(
                destination=NM,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise BackendError(
                f"networkmanager back-end: {member}: {reply.error_name}: {reply.body}"
            )
        return list(reply.body)

    async def apply(self, interface: str) -> None:
        from dbus_fast import Variant

        bus = await self._bus()
        try:
            for name in self.interfaces:
                [device] = await self._call(bus, NM_PATH, NM, "GetDeviceByIpIface", "s", [name])
                if name == interface:
                    [state] = await self._call(
                        bus,
                        device,
                        "org.freedesktop.DBus.Properties",
                        "Get",
                        "ss",
                        [DEVICE, "State"],
                    )
                    if state.value != ACTIVATED:
                        await self._call(
                            bus, NM_PATH, NM, "ActivateConnection", "ooo", ["/", device, "/"]
                        )
                        continue  # activation applies the profile; reapply on the next call
                metric = WIN_METRIC if name == interface else -1
                try:
                    settings, version = await self._call(
                        bus, device, DEVICE, "GetAppliedConnection", "u", [0]
                    )
                except BackendError:
                    continue  # not active: nothing to demote
                for family in ("ipv4", "ipv6"):
                    if family in settings:
                        settings[family]["route-metric"] = Variant("x", metric)
                await self._call(
                    bus, device, DEVICE, "Reapply", "a{sa{sv}}tu", [settings, version, 0]
                )
        finally:
            bus.disconnect()

    async def release(self) -> None:
        """Nothing to undo: reapplied metrics last until the connection is next activated."""
