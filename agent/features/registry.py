"""The configuration-key registry, assembled from the feature profiles' key specs.

The order is GetConfiguration's: Core (OCPP 1.6 section 9.1), then each further profile's
keys. A new key goes in its feature's ``keys.py``; a new feature adds its tuple here.
"""

from __future__ import annotations

from agent.core import config_keys
from agent.core.config_keys import Access, KeySpec
from agent.features.core import keys as core
from agent.features.firmware import keys as firmware
from agent.features.local_auth_list import keys as local_auth_list
from agent.features.reservation import keys as reservation
from agent.features.security import keys as security
from agent.features.smart_charging import keys as smart_charging

#: The profiles this build implements, as ``SupportedFeatureProfiles`` lists them.
FEATURE_PROFILES = (
    "Core",
    "SmartCharging",
    "RemoteTrigger",
    "LocalAuthListManagement",
    "Reservation",
    firmware.FEATURE_PROFILE,
)

KEYS: tuple[KeySpec, ...] = (
    *core.keys(FEATURE_PROFILES),
    *smart_charging.KEYS,
    *local_auth_list.KEYS,
    *reservation.KEYS,
    *security.KEYS,
    *firmware.keys(allow_http=False),
)

SPECS: dict[str, KeySpec] = {spec.name: spec for spec in KEYS}


class ConfigKeys(config_keys.ConfigKeys):
    """:class:`agent.core.config_keys.ConfigKeys` over every key of this build."""

    def __init__(
        self,
        *,
        stored: dict[str, str] | None = None,
        overrides: dict[str, object] | None = None,
        fixed: dict[str, str] | None = None,
    ) -> None:
        super().__init__(KEYS, stored=stored, overrides=overrides, fixed=fixed)


def is_secret(key: str) -> bool:
    """True for keys whose values must never be returned or logged."""
    spec = SPECS.get(key)
    return spec is not None and spec.access is Access.WRITE_ONLY
