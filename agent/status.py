"""What ``evcp status`` and ``evcp queue`` show: a snapshot of the charge point, its
features and its queue (the control socket's answers; JSON for ``--json``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.assembly import ChargePoint
from agent.chargepoint.model import Connector
from agent.config import Config
from agent.core.connector import ERROR_CODES
from agent.core.metering import energy_register_wh
from agent.core.timefmt import iso
from agent.store import Store

log = logging.getLogger("evcp.station")


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def fault_reason(c: Connector) -> str | None:
    """Why a connector is Faulted, in words a field engineer can act on."""
    if not c.controller_up:
        return "the EVSE controller does not answer"
    status = c.evse_status
    if status is not None and status.fault is not None:
        vendor = f", controller code {status.vendor_code}" if status.vendor_code else ""
        fault = status.fault.value.replace("_", " ")
        return f"the EVSE controller reports {fault} ({ERROR_CODES[status.fault]}{vendor})"
    if c.meter_failed:
        return f"the meter does not answer ({c.meter_misses} reads missed)"
    return None


def starting_snapshot(cfg: Config, store: Store, phase: str) -> dict[str, Any]:
    """``evcp status`` before the charge point runs (waiting for the clock, say)."""
    pending, failed = store.queue_counts()
    return {
        "version": __version__,
        "pid": os.getpid(),
        "phase": phase,
        "csms": {
            "connected": False,
            "registered": False,
            "url": cfg.csms["url"],
            "charge_point_id": cfg.csms["charge_point_id"],
            "last_error": None,
        },
        "queue": {"pending": pending, "failed": failed, "dropped": store.queue_dropped()},
        "storage": store.storage_status(),
        "reservations": [],
        "connectors": [],
    }


def snapshot(
    charger: ChargePoint,
    extra: Mapping[str, Any] | None = None,
    uplink: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``evcp status --json`` prints (``extra`` merged in: the session's part).
    ``uplink``: the uplink supervisor's snapshot; the key is absent without ``[uplink]``."""
    station, features = charger.station, charger.features
    store = station.store
    pending, failed = store.queue_counts()
    connectors = []
    for c in station.connectors.values():
        reading = c.reading
        status, code, _vendor = station.status_of(c.id)
        connectors.append(
            {
                "id": c.id,
                "status": status,
                "error_code": code,
                "vehicle": c.vehicle.value,
                "offered_current_a": c.offered_current_a,
                "limit_a": c.limit_a,
                "power_w": (reading.power_w or 0.0) if reading else 0.0,
                "energy_wh": reading.energy_wh if reading else 0.0,
                "transaction_id": station.csms_transaction_id(c),
                "transaction_local_id": c.tx.local_id if c.tx else None,
                "session_energy_wh": (
                    max(energy_register_wh(reading), c.tx.highest_wh) - c.tx.meter_start_wh
                    if c.tx is not None and reading is not None
                    else None
                ),
                "fault": fault_reason(c) if status == "Faulted" else None,
                "meter_ok": not c.meter_failed,
                "controller_firmware": c.hw.evse.capabilities.firmware,
            }
        )
    out = {
        "version": __version__,
        "pid": os.getpid(),
        "phase": "running",
        "csms": {
            "connected": station.connected,
            "registered": station.registered,
            "url": station.cfg.csms["url"],
            "charge_point_id": station.cfg.csms["charge_point_id"],
            "last_error": station.last_connect_error,
        },
        "queue": {"pending": pending, "failed": failed, "dropped": store.queue_dropped()},
        "storage": store.storage_status(),
        "local_list_version": features.local_auth_list.list_version(),
        "security": features.security.snapshot(),
        "reservations": features.reservation.snapshot(),
        "clock": {"now": iso(station.now())},
        "connectors": connectors,
    }
    if uplink is not None:
        out["uplink"] = dict(uplink)
    return _merge(out, extra or {})


def failed_messages(store: Store) -> list[dict[str, Any]]:
    """What ``evcp queue --json`` lists: the messages given up on, oldest first."""
    failed = []
    for seq, action, local_id, taken, error in store.queue_failed():
        failed.append(
            {
                "seq": seq,
                "action": action,
                "local_transaction": local_id,
                "transaction_id": (
                    None if local_id is None else store.csms_transaction_id(local_id)
                ),
                "taken_at": taken,
                "last_error": error,
            }
        )
    return failed


def retry_failed_messages(charger: ChargePoint) -> int:
    """``evcp queue retry``: every message given up on goes back into the queue, in its
    place, with TransactionMessageAttempts new tries; sending starts at once."""
    station = charger.station
    count = station.store.queue_retry_failed()
    if count:
        log.warning("%d failed transaction message(s) put back in the queue", count)
        station.send_queue_now()
    return count
