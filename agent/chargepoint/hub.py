"""What the station's parts (transactions, metering, actuation) use of the station and of
each other: the :class:`Hub`. Inside ``agent.chargepoint`` only; features use
:class:`agent.chargepoint.port.ChargePointPort`. A protocol, so the parts need not import
the station (no import cycle, not even one for type checking)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, Protocol

from agent.chargepoint.model import Connector
from agent.chargepoint.port import LimitSource, StartGuard, TagAuthority
from agent.config import Config
from agent.core import smart_charging as sc
from agent.core.config_keys import ConfigKeys
from agent.logs import tx_fields, tx_name
from agent.outbox import Outbox
from agent.store import Store
from drivers.base import MeterReading


class MeteringPart(Protocol):
    async def read_meter(self, c: Connector) -> MeterReading | None: ...

    def stop_txn_sample(
        self, c: Connector, reading: MeterReading, context: str, now: datetime
    ) -> list[dict[str, Any]]: ...

    def last_register(self, c: Connector, context: str) -> list[dict[str, Any]]: ...

    def restart_sampler(self, c: Connector) -> None: ...


class TransactionsPart(Protocol):
    def meter_lost(self, c: Connector) -> None: ...

    def check_invalid_energy(self, c: Connector, reading: MeterReading) -> None: ...


class ActuationPart(Protocol):
    async def actuate_with_others(self, c: Connector, *, others_first: bool) -> None: ...


class Hub(Protocol):
    """The station as its parts see it."""

    @property
    def cfg(self) -> Config: ...
    @property
    def store(self) -> Store: ...
    @property
    def keys(self) -> ConfigKeys: ...
    @property
    def limits(self) -> LimitSource: ...
    @property
    def tags(self) -> TagAuthority: ...
    @property
    def guard(self) -> StartGuard: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def connectors(self) -> dict[int, Connector]: ...
    @property
    def registered(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def operative0(self) -> bool: ...
    @property
    def max_current_a(self) -> float: ...
    @property
    def voltage_v(self) -> float: ...
    @property
    def phases(self) -> int: ...
    @property
    def meter_time_scale(self) -> float: ...
    @property
    def metering(self) -> MeteringPart: ...
    @property
    def transactions(self) -> TransactionsPart: ...
    @property
    def actuation(self) -> ActuationPart: ...

    def now(self) -> datetime: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...

    def refresh_status(self, c: Connector) -> None: ...

    async def actuate(self, c: Connector) -> None: ...

    def controller_retry_s(self) -> float: ...

    def apply_pending_availability(self, c: Connector) -> None: ...

    def run_idle_callbacks(self) -> None: ...

    def tx_for_profiles(self, c: Connector | None) -> sc.Tx | None: ...


def connector_fields(store: Store, c: Connector) -> dict[str, str]:
    """The journald fields of a log line about ``c`` (and its transaction, if any)."""
    local = c.tx.local_id if c.tx is not None else None
    return tx_fields(c.id, local, None if local is None else store.csms_transaction_id(local))


def transaction_fields(store: Store, connector: int | None, local_id: int) -> dict[str, str]:
    """The journald fields of a log line about transaction ``local_id``."""
    return tx_fields(connector, local_id, store.csms_transaction_id(local_id))


def transaction_name(store: Store, local_id: int) -> str:
    """``transaction 1001 (local 7)``: see :func:`agent.logs.tx_name`."""
    return tx_name(local_id, store.csms_transaction_id(local_id))
