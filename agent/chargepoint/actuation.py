"""Actuation: bring each EVSE controller in line with availability, transaction and limit.

The limit comes from the installed charging profiles (a :class:`LimitSource`), recomputed
at every change and at the next profile boundary (a timer, not polling).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.chargepoint.logfields import connector_fields
from agent.chargepoint.model import Connector
from agent.core import smart_charging as sc
from drivers.base import IEC61851_MIN_CURRENT_A, ControlMode, CurrentNotApplied, DriverError

if TYPE_CHECKING:  # (annotations only: the protocol costs memory at run time)
    from agent.chargepoint.hub import Hub

log = logging.getLogger("evcp.station")


class Actuation:
    """The station's actuation part: limits, controller commands, the boundary timer."""

    def __init__(self, station: Hub) -> None:
        self.st = station
        self._limit_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._limit_timer is not None:
            self._limit_timer.cancel()
            self._limit_timer = None

    def tx_for_profiles(self, c: Connector | None) -> sc.Tx | None:
        if c is None or c.tx is None:
            return None
        return sc.Tx(self.st.store.csms_transaction_id(c.tx.local_id), c.tx.start)

    def hardware_max_a(self, c: Connector) -> float:
        """The supply's limit, or the controller's when it is lower (it refuses more)."""
        return min(self.st.max_current_a, c.hw.evse.capabilities.max_current_a)

    def compute_limits(self) -> dict[int, float]:
        """Every connector's limit now (a ChargePointMaxProfile is shared between sessions)."""
        st = self.st
        charging = sorted(
            (c for c in st.connectors.values() if c.tx is not None),
            key=lambda c: (c.tx.start if c.tx else st.now(), c.id),
        )
        return st.limits.limits(
            st.now(),
            {c.id: self.tx_for_profiles(c) for c in st.connectors.values()},
            hardware_max_a={c.id: self.hardware_max_a(c) for c in st.connectors.values()},
            charging=[c.id for c in charging],
        )

    def compute_limit(self, c: Connector) -> float:
        return self.compute_limits()[c.id]

    async def actuate(self, c: Connector) -> None:
        """Bring the controller in line with availability, transaction and limit."""
        st = self.st
        async with c.actuate_lock:
            c.limit_a = self.compute_limit(c)
            if st.stopping:
                mode, current = ControlMode.PAUSED, None  # the agent winds down
            elif not c.operative or not st.operative0:
                mode, current = ControlMode.DISABLED, None
            elif (
                c.tx is None
                or c.tx.energy_off  # the transaction is closing: energy off first
                or c.tx.suspended_invalid
                or c.meter_failed  # no energy that nothing meters
                or c.limit_a < max(IEC61851_MIN_CURRENT_A, c.hw.evse.capabilities.min_current_a)
            ):
                mode, current = ControlMode.PAUSED, None
            else:
                mode, current = ControlMode.ENABLED, c.limit_a
            # SuspendedEVSE starts when we decide to pause, but ends only once the controller
            # has really resumed: events it sends while we command it would otherwise be
            # reported as a spurious SuspendedEV between SuspendedEVSE and Charging.
            if c.tx is not None and mode is ControlMode.PAUSED:
                c.paused_by_evse = True
            evse = c.hw.evse
            try:
                if current is not None and current != c.applied_current_a:
                    try:
                        c.applied_current_a = await evse.set_offered_current(current)
                        log.info(
                            "connector %d: offering %.1f A",
                            c.id,
                            c.applied_current_a,
                            extra=connector_fields(self.st.store, c),
                        )
                    except CurrentNotApplied as exc:
                        # The controller's own decision (its range, its temperature): taken
                        # as it is, not repeated; the next change of state tries again.
                        c.applied_current_a = exc.applied_a
                        log.warning(
                            "connector %d: %s", c.id, exc, extra=connector_fields(self.st.store, c)
                        )
                if mode is not c.applied_mode:
                    await {
                        ControlMode.ENABLED: evse.enable,
                        ControlMode.PAUSED: evse.pause,
                        ControlMode.DISABLED: evse.disable,
                    }[mode]()
                    c.applied_mode = mode
                    log.info(
                        "connector %d: controller %s",
                        c.id,
                        mode.value,
                        extra=connector_fields(self.st.store, c),
                    )
                    # Report from the controller's state after the command, not before it.
                    c.evse_status = await evse.read_status()
                c.actuate_failed = False
            except DriverError as exc:
                log.error("connector %d: could not command the controller (retrying in %.0f"
                          " s): %s", c.id, st.controller_retry_s(), exc, extra=connector_fields(self.st.store, c))  # fmt: skip
                c.actuate_failed = True
                c.applied_mode, c.applied_current_a = None, None  # unknown: command it again
            c.paused_by_evse = c.tx is not None and (
                mode is ControlMode.PAUSED or c.applied_mode is ControlMode.PAUSED
            )
            st.refresh_status(c)
        self._arm_limit_timer()

    def _arm_limit_timer(self) -> None:
        """Recompute limits at the next profile boundary (a timer, not polling)."""
        if self._limit_timer is not None:
            self._limit_timer.cancel()
            self._limit_timer = None
        st = self.st
        now = st.now()
        edge = st.limits.next_boundary(
            now, [c.tx.start if c.tx else None for c in st.connectors.values()]
        )
        if edge is not None:
            # Re-check at least every 10 minutes: the timer runs on the monotonic clock, and
            # the wall clock the profiles are written in may be corrected (NTP) meanwhile.
            delay = min(max(0.0, (edge - now).total_seconds()) + 0.001, 600.0)
            self._limit_timer = asyncio.get_running_loop().call_later(delay, self._on_limit_timer)

    def _on_limit_timer(self) -> None:
        self._limit_timer = None
        self.actuate_all()

    def actuate_all(self) -> None:
        self.st.spawn(self._actuate_all(), "actuate-all")

    async def _actuate_all(self) -> None:
        """Actuate every connector, those whose current falls first: a ChargePointMaxProfile
        shared between connectors is not exceeded while they change one after the other."""
        limits = self.compute_limits()
        connectors = self.st.connectors.values()
        for c in sorted(connectors, key=lambda c: limits[c.id] - c.offered_current_a):
            await self.actuate(c)

    async def actuate_with_others(self, c: Connector, *, others_first: bool) -> None:
        """Actuate ``c`` after a transaction started (``others_first``) or stopped on it: the
        other sessions' share of a ChargePointMaxProfile changes too (smaller ones first)."""
        others = [o for o in self.st.connectors.values() if o is not c and o.tx is not None]
        if others_first:
            for other in others:
                await self.actuate(other)
        await self.actuate(c)
        if not others_first:
            for other in others:
                await self.actuate(other)
