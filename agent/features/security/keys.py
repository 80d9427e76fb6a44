"""Security extension configuration keys (OCPP 1.6 security whitepaper)."""

from __future__ import annotations

from agent.core.config_keys import RO, Access, KeySpec, Kind, int_key

KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "AuthorizationKey",
        Kind.STR,
        "",
        access=Access.WRITE_ONLY,
        min_length=16,
        max_length=40,
    ),
    int_key("SecurityProfile", 2, access=RO),
    KeySpec("CpoName", Kind.STR, "", max_length=64),
)
