"""The agent's asyncio helpers.

``raise_if_cancelling`` is defined with the drivers (``drivers.aio``), which need it too and
may not import the agent; the agent's modules take it from here.
"""

from __future__ import annotations

from drivers.aio import raise_if_cancelling

__all__ = ["raise_if_cancelling"]
