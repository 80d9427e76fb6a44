"""Reservation configuration keys (OCPP 1.6 section 9.3)."""

from __future__ import annotations

from agent.core.config_keys import RO, KeySpec, bool_key

KEYS: tuple[KeySpec, ...] = (bool_key("ReserveConnectorZeroSupported", True, access=RO),)
