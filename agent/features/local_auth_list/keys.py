"""Local Auth List Management configuration keys (OCPP 1.6 section 9.2)."""

from __future__ import annotations

from agent.core.config_keys import RO, KeySpec, bool_key, int_key

KEYS: tuple[KeySpec, ...] = (
    bool_key("LocalAuthListEnabled", True),
    int_key("LocalAuthListMaxLength", 10000, access=RO),
    int_key("SendLocalListMaxLength", 1000, access=RO),
)
