"""CSMS requests, one ``@on``/``@after`` mixin per OCPP feature profile.

:class:`agent.ocpp.adapter.OcppAdapter` inherits them all (the ``ocpp`` library finds
``@on`` handlers on every base class). A handler translates the library's snake_case
kwargs, asks its feature's service (``agent.features.*``) and returns the library's result
dataclass at once; it never awaits a CALL (ocpp pitfall 1). Follow-up messages go through
the outbox; those that must follow the reply on the wire are queued from ``@after``.

A new OCPP message goes in its profile's module here, its logic in the feature's service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.assembly import Features
    from agent.core.config_keys import ConfigKeys


class ConnectionControl(Protocol):
    """What a handler may ask of the connection (the session implements it)."""

    def key_changed(self, value: str) -> bool:
        """A new AuthorizationKey was accepted: persist it and reconnect with it; False
        when it is the one in use."""
        ...

    def request_reconnect(self, reason: str) -> None:
        """Close the connection (once the CALL in flight is answered) and connect again."""
        ...

    def heartbeat_interval_changed(self) -> None: ...


class Handlers:
    """What every handler mixin may use (set by the adapter)."""

    features: Features
    keys: ConfigKeys
    control: ConnectionControl
