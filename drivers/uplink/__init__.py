"""Uplink drivers: link state from netlink, probes bound to one interface, the back-ends
that make one link's default route win, and the GSM modem's AT port.

Nothing here imports ``agent``: the supervisor (``agent/uplink/``) decides, these act.
"""

from __future__ import annotations

from drivers.base import DriverError

__all__ = ["BackendError"]


class BackendError(DriverError):
    """A back-end cannot make the chosen link win (no capability, no D-Bus, no route...).

    The message says what is missing and how to fix it; the agent logs it once and carries
    on over whatever path works."""
