"""Journald fields and names of a connector's transaction, for the charge point's log
lines (``EVCP_CONNECTOR``, ``EVCP_TRANSACTION``, ``EVCP_CSMS_TRANSACTION``)."""

from __future__ import annotations

from agent.chargepoint.model import Connector
from agent.logs import tx_fields, tx_name
from agent.store import Store


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
