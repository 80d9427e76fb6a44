"""The narrow ports between the charge point and the feature profiles.

:class:`ChargePointPort` is all a feature (``agent.features.*``) may use of the charge
point: its connectors, the clock, status, actuation, transactions, and a way to run work
once no transaction is running. The charge point, in turn, sees the features it needs
only through the small protocols below (the smart-charging limits, the idTag authority,
the reservations' start guard), which ``agent.app`` wires in. No feature imports
:class:`agent.chargepoint.station.Station`, and the charge point imports no feature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from agent.chargepoint.model import Connector
from agent.core import smart_charging as sc
from agent.outbox import Outbox


class ChargePointPort(Protocol):
    """What a feature profile may use of the charge point."""

    @property
    def connectors(self) -> Mapping[int, Connector]: ...

    @property
    def registered(self) -> bool:
        """The CSMS accepted our BootNotification in this process."""
        ...

    @property
    def operative0(self) -> bool:
        """Connector 0 (the charger as a whole) is Operative."""
        ...

    @property
    def outbox(self) -> Outbox:
        """Where volatile (non-transaction) messages go; ``online`` says if it is up."""
        ...

    def now(self) -> datetime: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; its exception is logged, never lost."""
        ...

    def refresh_status(self, c: Connector) -> None:
        """Derive ``c``'s status again (an input a feature owns changed) and report it."""
        ...

    def send_status(self, connector_id: int, *, triggered: bool = False) -> None: ...

    def report_start_failure(self, c: Connector, info: str) -> None:
        """A start that was accepted could not happen: tell the CSMS (StatusNotification
        with errorCode OtherError and ``info``), then the status as it is."""
        ...

    async def actuate(self, c: Connector) -> None: ...

    def actuate_all(self) -> None:
        """Bring every controller in line with the limits (after a profile change)."""
        ...

    async def authorize(self, id_tag: str) -> tuple[str, str | None]:
        """(status, parentIdTag): local list, cache, Authorize.req or the offline rules."""
        ...

    def pick_connector(
        self, connector_id: int | None, id_tag: str | None = None
    ) -> Connector | None: ...

    def wait_for_vehicle(
        self, c: Connector, id_tag: str, parent: str | None, profile: dict[str, Any] | None = None
    ) -> None:
        """Authorized: start once a vehicle is plugged in (within ConnectionTimeOut)."""
        ...

    async def start_transaction(
        self,
        c: Connector,
        id_tag: str,
        parent: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> bool: ...

    async def stop_transaction(
        self, c: Connector, reason: str, *, id_tag: str | None = None
    ) -> bool: ...

    def csms_transaction_id(self, c: Connector) -> int | None:
        """The CSMS's id of ``c``'s running transaction (None: none, or not known yet)."""
        ...

    def tx_for_profiles(self, c: Connector | None) -> sc.Tx | None: ...

    def hardware_max_a(self, c: Connector) -> float: ...

    def change_availability(self, connector_id: int, operative: bool) -> str:
        """Accepted, Scheduled (after the running transactions) or Rejected."""
        ...

    def triggered_meter_values(self, c: Connector) -> list[dict[str, Any]]:
        """MeterValue entries for a TriggerMessage(MeterValues): now, or the last register."""
        ...

    def block_charging(self, blocked: bool, reason: str = "") -> None:
        """While ``blocked``, no new transaction starts (idle connectors Unavailable)."""
        ...

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no transaction is running or starting (now if none is)."""
        ...

    def note_reset(self, kind: str) -> None:
        """A Reset (``Soft``/``Hard``) is under way: the next start closes what is left
        open with its reason."""
        ...

    def request_restart(self, kind: str) -> None:
        """Restart the agent (a Reset): ``Soft`` or ``Hard``."""
        ...

    def request_boot(self) -> None:
        """Send a BootNotification now (TriggerMessage)."""
        ...


class LimitSource(Protocol):
    """The installed charging profiles, as the charge point's actuation sees them
    (``agent.features.smart_charging``)."""

    def limits(
        self,
        now: datetime,
        txs: Mapping[int, sc.Tx | None],
        *,
        hardware_max_a: Mapping[int, float],
        charging: Sequence[int],
    ) -> dict[int, float]: ...

    def next_boundary(
        self, now: datetime, tx_starts: Iterable[datetime | None]
    ) -> datetime | None: ...

    def end_transaction(self, connector_id: int) -> bool:
        """A transaction ended on ``connector_id``: its TxProfile goes."""
        ...

    def install_remote(self, connector_id: int, body: dict[str, Any], tx: sc.Tx) -> bool:
        """RemoteStartTransaction's chargingProfile, once its transaction started."""
        ...


class TagDecision(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def parent_id_tag(self) -> str | None: ...

    @property
    def source(self) -> str: ...


class TagAuthority(Protocol):
    """What the charge point asks of the local authorization list and cache
    (``agent.features.local_auth_list``)."""

    def pre_authorized(self, id_tag: str) -> TagDecision | None: ...

    def offline(self, id_tag: str) -> TagDecision: ...

    def parent_of(self, id_tag: str) -> str | None: ...

    def remember(self, id_tag: str, info: Any) -> None: ...


class StartGuard(Protocol):
    """Which idTag may start where (``agent.features.reservation``)."""

    def check_start(
        self, c: Connector, id_tag: str, parent_id_tag: str | None
    ) -> tuple[bool, int | None]:
        """(allowed, reservationId to put in the StartTransaction)."""
        ...

    def consume(self, reservation_id: int | None, transaction: int) -> None: ...

    def held_for(self, c: Connector, id_tag: str) -> bool:
        """``c`` is reserved for ``id_tag`` (or its group)."""
        ...

    def reserved_for_others(self, c: Connector, id_tag: str) -> bool: ...

    def update_flags(self) -> list[Connector]:
        """Set each connector's ``reserved`` input; return the connectors that changed."""
        ...
