"""The charge point: connectors, transactions, authorization, metering, actuation.

The :class:`Station` turns hardware events (EVSE controller, meter), local events (an RFID
swipe) and CSMS requests (through ``agent.ocpp.adapter``) into hardware commands and OCPP
messages. It never touches the WebSocket: outgoing messages go to the :class:`Outbox`
(volatile) or to the store's durable queue (transaction messages), and the session's single
sender delivers them. Decisions that need no I/O live in ``agent.core``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent import __version__
from agent.aio import raise_if_cancelling
from agent.auth import ID_TAG_STATUSES, Authorizer
from agent.charging import ChargingProfiles
from agent.config import Config
from agent.core import smart_charging as sc
from agent.core.config_keys import ConfigKeys
from agent.core.connector import (
    ConnectorInputs,
    Status,
    connector_zero_status,
    derive_status,
    error_code,
)
from agent.core.metering import energy_register_wh, meter_value, sampled_values
from agent.outbox import NotConnected, Outbox, Outgoing
from agent.reservations import Reservations
from agent.store import Store, TxRecord
from drivers.base import (
    IEC61851_MIN_CURRENT_A,
    ControlMode,
    CurrentNotApplied,
    DriverError,
    EvseController,
    EvseStatus,
    FaultCode,
    Meter,
    MeterReading,
    ProtocolError,
    TransientDriverError,
    VehicleState,
)

log = logging.getLogger("evcp.station")

#: Vehicle states with a vehicle on the cable.
PLUGGED = (VehicleState.CONNECTED, VehicleState.REQUESTING, VehicleState.CHARGING)

#: The longest GetCompositeSchedule answered (longer requests get this much).
MAX_COMPOSITE_S = 7 * 86400

#: Seconds between attempts to start an EVSE controller that did not start, or to repeat
#: a command to it that failed.
CONTROLLER_RETRY_S = 5.0

#: The most bytes (as JSON) of StopTxnSampledData/StopTxnAlignedData values one
#: StopTransaction carries: beyond, every other value goes (coarser, never bigger). Many
#: CSMS stacks refuse WebSocket frames over 64 KiB.
MAX_STOP_SAMPLE_BYTES = 16_000


def _taken_at(sample: dict[str, Any]) -> str:
    return str(sample["timestamp"])


def next_aligned(now: datetime, interval_s: int) -> datetime:
    """The next clock-aligned instant after ``now``: every ``interval_s`` seconds from
    midnight, evenly spaced per day (OCPP 1.6 9.1.4), so an interval that does not divide
    a day still has a value at the next 00:00."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = (now - midnight).total_seconds()
    next_at = midnight + timedelta(seconds=(elapsed // interval_s + 1) * interval_s)
    return min(next_at, midnight + timedelta(days=1))


def _context(sample: dict[str, Any]) -> str | None:
    """The reading context of a MeterValue (all its sampled values share one)."""
    values = sample.get("sampledValue") or [{}]
    context = values[0].get("context")
    return str(context) if context is not None else None


class Clock(Protocol):
    def now(self) -> datetime: ...


def iso(ts: datetime) -> str:
    """OCPP timestamp: UTC, milliseconds, 'Z'."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class ConnectorHardware:
    evse: EvseController
    meter: Meter


@dataclass(slots=True)
class ActiveTx:
    local_id: int
    id_tag: str
    meter_start_wh: int
    start: datetime
    begin_sample: list[dict[str, Any]]
    parent_id_tag: str | None = None
    #: StopTxnSampledData (Sample.Periodic) and StopTxnAlignedData (Sample.Clock) values
    #: taken during the transaction, for StopTransaction's transactionData. In memory only:
    #: after a power loss the StopTransaction carries what is left (the MeterValues of the
    #: transaction were queued durably on their own).
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_bytes: int = 0
    suspended_invalid: bool = False
    #: Register (Wh) at which energy stops after the CSMS invalidated the idTag and
    #: StopTransactionOnInvalidId is false: the register then + MaxEnergyOnInvalidId.
    invalid_energy_limit_wh: int | None = None
    #: A stop is under way (it awaits the last meter reading): a second one must not queue
    #: another StopTransaction (RemoteStop and an unplug at the same moment).
    stopping: bool = False
    #: The highest register (Wh) read during the transaction: meterStop is never below it
    #: (a meter replaced or reset mid-session must not erase the energy already delivered;
    #: a restart after a power loss uses the same stored maximum).
    highest_wh: int = 0


@dataclass(slots=True)
class Connector:
    id: int
    hw: ConnectorHardware
    evse_status: EvseStatus | None = None
    reading: MeterReading | None = None
    reading_at: datetime | None = None  # when ``reading`` was taken
    #: The last register the meter gave and when, accepted or not: the baseline against
    #: which the next one is judged plausible.
    last_raw: tuple[float, datetime] | None = None
    meter_misses: int = 0
    meter_failed: bool = False
    operative: bool = True
    charger_operative: bool = True  # connector 0's availability: the charger as a whole
    pending_inoperative: bool | None = None  # Scheduled availability change
    tx: ActiveTx | None = None
    starting: bool = False  # a transaction is being started (authorizing, reading the meter)
    controller_up: bool = False  # the EVSE controller's driver started
    actuate_failed: bool = False  # the last command to the controller failed: retry it
    last_vehicle: VehicleState | None = None  # the last vehicle state that was not a fault
    waiting_tag: tuple[str, str | None] | None = None  # (idTag, parentIdTag)
    waiting_profile: dict[str, Any] | None = None  # from RemoteStartTransaction
    waiting_deadline: asyncio.TimerHandle | None = None
    finishing: bool = False
    reserved: bool = False  # held by a reservation (agent.reservations)
    limit_a: float = 0.0
    applied_mode: ControlMode | None = None
    applied_current_a: float | None = None
    paused_by_evse: bool = False
    observed: tuple[str, str, str | None] | None = None
    reported: tuple[str, str, str | None] | None = None
    status_timer: asyncio.TimerHandle | None = None
    sampler: asyncio.Task[None] | None = None
    actuate_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def vehicle(self) -> VehicleState:
        return self.evse_status.vehicle if self.evse_status else VehicleState.UNKNOWN

    @property
    def usable(self) -> bool:
        """Operative itself and as part of the charger (connector 0 Operative too)."""
        return self.operative and self.charger_operative

    @property
    def can_start(self) -> bool:
        """Free for a new transaction: usable, no fault, a working meter, none running."""
        return (
            self.tx is None
            and not self.starting
            and self.usable
            and self.inputs().fault is None
            and not self.meter_failed
        )

    @property
    def plugged(self) -> bool:
        return self.vehicle in (
            VehicleState.CONNECTED,
            VehicleState.REQUESTING,
            VehicleState.CHARGING,
        )

    def inputs(self) -> ConnectorInputs:
        status = self.evse_status
        if status is not None:
            fault = status.fault
        else:  # no word from the controller yet: Faulted (InternalError) until it starts
            fault = None if self.controller_up else FaultCode.COMMUNICATION
        return ConnectorInputs(
            vehicle=self.vehicle,
            fault=fault,
            meter_failed=self.meter_failed,
            operative=self.usable,
            transaction=self.tx is not None,
            reserved=self.reserved,
            waiting_for_vehicle=self.waiting_tag is not None,
            paused_by_evse=self.paused_by_evse,
            finishing=self.finishing,
        )

    @property
    def offered_current_a(self) -> float:
        if self.applied_mode is ControlMode.ENABLED and self.applied_current_a is not None:
            return self.applied_current_a
        return 0.0


class Station:
    """The charge point. Create, ``await start()``, then run ``run()`` in a TaskGroup."""

    def __init__(
        self,
        *,
        cfg: Config,
        store: Store,
        keys: ConfigKeys,
        clock: Clock,
        hardware: list[ConnectorHardware],
        request_restart: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.clock = clock
        self.outbox = Outbox()
        self.connectors = {i + 1: Connector(i + 1, hw) for i, hw in enumerate(hardware)}
        self.registered = False  # BootNotification accepted in this process
        self.connected = False
        self.last_connect_error: str | None = None
        self.operative0 = self.store.get("availability.0", "Operative") == "Operative"
        self._pending_operative0: bool | None = None  # Scheduled change of connector 0
        self._request_restart = request_restart
        self._tasks: set[asyncio.Task[Any]] = set()
        self._limit_timer: asyncio.TimerHandle | None = None
        self._flush_timer: asyncio.TimerHandle | None = None  # staged MeterValues to disk
        self._wake_aligned = asyncio.Event()
        self._restarting = False
        #: Set by the session: queue a BootNotification now (TriggerMessage).
        self.request_boot: Callable[[], None] = lambda: None
        #: Set by the session: send the queue's head now, whatever retry delay it waits on.
        self.send_queue_now: Callable[[], None] = lambda: None
        #: The agent is stopping: controllers are paused and stay paused.
        self.stopping = False
        self.max_current_a = float(cfg.hardware["max_current_a"])
        self.voltage_v = float(cfg.hardware["nominal_voltage_v"])
        self.phases = int(cfg.hardware["phases"])
        #: Simulated seconds per real second of the simulated meter (1 on real hardware):
        #: how fast its register may plausibly rise.
        self.meter_time_scale = 1.0
        if cfg.hardware.get("driver") == "sim":
            self.meter_time_scale = float(getattr(cfg, "sim", {}).get("time_scale", 1.0))
        self.charging = ChargingProfiles(
            store=store,
            keys=keys,
            connector_ids=self.connectors,
            max_current_a=self.max_current_a,
            voltage_v=self.voltage_v,
            phases=self.phases,
        )
        self.auth = Authorizer(store=store, keys=keys, now=self.now)
        self.reservations = Reservations(self)
        keys.subscribe(self._on_key_changed)

    # ================================================================== lifecycle
    def now(self) -> datetime:
        return self.clock.now()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; its exception is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def start(self) -> None:
        """Start the drivers, reload profiles, close what a power loss left open."""
        self.charging.load()
        for c in self.connectors.values():
            c.operative = self.store.get(f"availability.{c.id}", "Operative") == "Operative"
            c.charger_operative = self.operative0
            c.hw.evse.set_listener(functools.partial(self._on_evse_status, c))
            try:
                await c.hw.evse.start()
                c.controller_up = True
                c.evse_status = await c.hw.evse.read_status()
            except DriverError as exc:
                log.error("connector %d: EVSE controller unavailable (retrying every %.0f s):"
                          " %s", c.id, CONTROLLER_RETRY_S, exc)  # fmt: skip
            try:
                await c.hw.meter.connect()
                c.reading = await c.hw.meter.read()
                c.reading_at = self.now()
            except DriverError as exc:
                log.error("connector %d: meter unavailable: %s", c.id, exc)
        await self._recover_transactions()
        self.reservations.load()
        for c in self.connectors.values():
            await self.actuate(c)
            self._refresh_status(c)
            self._free_vend(c)  # a car left plugged in (a power cut): charging resumes

    async def _recover_transactions(self) -> None:
        """Close what the store still holds as running: the agent stopped mid-transaction.

        The reason says why: Reboot after an orderly local stop (SIGTERM: ``systemctl
        restart``, a reboot, a package upgrade); SoftReset/HardReset after a Reset from the
        CSMS (whose transactions are normally stopped before it, with the same reasons; one
        that could not be is closed here); PowerLoss with no such record (a crash, a
        SIGKILL, a power cut).
        """
        marker = self.store.get("reset.pending")
        self.store.put("reset.pending", None)
        reason = (
            {"Soft": "SoftReset", "Hard": "HardReset"}.get(marker, "Reboot")
            if marker
            else "PowerLoss"
        )
        for rec in self.store.active_transactions():
            c = self.connectors.get(rec.connector_id)
            meter_stop = rec.last_meter_wh if rec.last_meter_wh is not None else rec.meter_start_wh
            if c is not None and c.reading is not None:
                register_wh = energy_register_wh(c.reading)
                if register_wh >= meter_stop:
                    meter_stop = register_wh
                else:
                    # A register below what this transaction already saw is another meter
                    # (replaced, or reset): keep the last reading the transaction had.
                    log.warning(
                        "connector %d: meter register %d Wh is below the last reading %d Wh:"
                        " using the last reading as meterStop",
                        rec.connector_id,
                        register_wh,
                        meter_stop,
                    )
            log.warning(
                "transaction %d on connector %d was running at shutdown: stopping it (%s)",
                rec.local_id,
                rec.connector_id,
                reason,
            )
            self._stop_record(rec, meter_stop_wh=meter_stop, reason=reason, end_sample=[])

    async def pause_controllers(self) -> None:
        """No energy without the agent: a transaction ends with it (closed as Reboot or
        PowerLoss at the next start), so nothing after this point would be billed. From
        here on every actuation pauses (a profile boundary or a late start must not
        enable a controller again while the agent winds down)."""
        self.stopping = True
        for c in self.connectors.values():
            if not c.controller_up:
                continue
            try:
                async with asyncio.timeout(2.0), c.actuate_lock:  # after one in flight
                    if c.applied_mode in (ControlMode.PAUSED, ControlMode.DISABLED):
                        continue
                    await c.hw.evse.pause()
                    c.applied_mode = ControlMode.PAUSED
                log.info("connector %d: controller paused (the agent stops)", c.id)
            except (DriverError, TimeoutError) as exc:
                log.error("connector %d: could not pause the controller at exit: %s",
                          c.id, exc)  # fmt: skip

    async def close(self) -> None:
        self.reservations.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # (the store is closed next: it flushes then)
        for task in list(self._tasks):
            task.cancel()
        await self.pause_controllers()
        for c in self.connectors.values():
            with contextlib.suppress(DriverError):
                await c.hw.evse.close()
            with contextlib.suppress(DriverError):
                await c.hw.meter.close()

    async def run(self) -> None:
        """Long-running duties: meter polling and clock-aligned meter values."""
        async with asyncio.TaskGroup() as group:
            for c in self.connectors.values():
                group.create_task(self._poll_meter(c), name=f"meter-{c.id}")
                group.create_task(self._supervise_controller(c), name=f"controller-{c.id}")
            group.create_task(self._aligned_loop(), name="aligned")

    async def _supervise_controller(self, c: Connector) -> None:
        """Never leave a controller in a state the agent did not choose: start a driver
        that failed to start, and repeat a command that failed (a pause that did not
        reach the controller would leave a car charging outside any transaction)."""
        while True:
            await asyncio.sleep(CONTROLLER_RETRY_S)
            if not c.controller_up:
                try:
                    await c.hw.evse.start()
                    c.controller_up = True
                    c.evse_status = await c.hw.evse.read_status()
                    log.warning("connector %d: EVSE controller answers now", c.id)
                    self._refresh_status(c)
                except DriverError as exc:
                    log.debug("connector %d: EVSE controller still unavailable: %s", c.id, exc)
                    continue
                c.applied_mode, c.applied_current_a = None, None  # command it afresh
                await self.actuate(c)
            elif c.actuate_failed:
                await self.actuate(c)

    # ================================================================== hardware events
    def _on_evse_status(self, c: Connector, status: EvseStatus) -> None:
        before = c.evse_status
        c.evse_status = status
        # An unplug is judged from the vehicle state last *known*: a fault (a lost serial
        # line) says nothing about the vehicle, so FAULT -> ABSENT after an outage is still
        # an unplug. A plug-in from the state just before: FAULT -> CONNECTED starts an
        # authorization given meanwhile.
        known = c.last_vehicle or (before.vehicle if before is not None else None)
        was_plugged = before is not None and before.vehicle in PLUGGED
        if status.vehicle not in (VehicleState.FAULT, VehicleState.UNKNOWN):
            c.last_vehicle = status.vehicle
        if before is None or before.vehicle != status.vehicle or before.fault != status.fault:
            log.info(
                "connector %d: vehicle %s%s",
                c.id,
                status.vehicle.value,
                f", fault {status.fault.value} ({status.vendor_code})" if status.fault else "",
            )
        if c.plugged and not was_plugged:
            self._on_plugged(c)
        elif known in PLUGGED and status.vehicle is VehicleState.ABSENT:
            self._on_unplugged(c)
        self._refresh_status(c)

    def _on_plugged(self, c: Connector) -> None:
        if c.waiting_tag is not None and c.tx is None:
            tag, parent = c.waiting_tag
            profile = c.waiting_profile
            self._clear_waiting(c)
            self.spawn(self.start_transaction(c, tag, parent, profile), f"start-{c.id}")
        else:
            self._free_vend(c)

    def _free_vend(self, c: Connector) -> None:
        """``[agent] free_vend_id_tag`` (a charger without a card reader): a car plugged
        in starts a transaction with that idTag, authorized by the owner's configuration
        (no Authorize.req; the StartTransaction answer still counts). A reservation for
        someone else, an unusable connector or one already taken starts nothing."""
        tag = str(self.cfg.agent["free_vend_id_tag"])
        if not tag or not c.plugged or not c.can_start or c.waiting_tag is not None:
            return
        if not self.reservations.check_start(c, tag, None)[0]:
            log.info("connector %d: car plugged in, but reserved for another idTag", c.id)
            return
        log.info("connector %d: car plugged in: starting (free vend)", c.id)
        self.spawn(self.start_transaction(c, tag), f"start-{c.id}")

    def _on_unplugged(self, c: Connector) -> None:
        c.finishing = False
        if c.tx is not None and self.keys.get_bool("StopTransactionOnEVSideDisconnect"):
            self.spawn(self.stop_transaction(c, "EVDisconnected"), f"stop-{c.id}")
        if c.hw.evse.capabilities.supports_unlock and self.keys.get_bool(
            "UnlockConnectorOnEVSideDisconnect"
        ):
            self.spawn(self._release_cable(c), f"release-{c.id}")

    async def _release_cable(self, c: Connector) -> None:
        """The cable came out of the EV: open the charger's lock so it can be taken
        (UnlockConnectorOnEVSideDisconnect, OCPP 1.6 9.1.33)."""
        try:
            if not await c.hw.evse.unlock():
                log.warning("connector %d: the cable lock did not open after the EV was"
                            " unplugged", c.id)  # fmt: skip
        except DriverError as exc:
            log.error("connector %d: could not open the cable lock after the EV was"
                      " unplugged: %s", c.id, exc)  # fmt: skip

    async def _poll_meter(self, c: Connector) -> None:
        while True:
            await self.read_meter(c)
            await asyncio.sleep(float(self.cfg.hardware["meter_poll_s"]))

    def _check_plausible(self, c: Connector, reading: MeterReading) -> None:
        """Refuse (as a misread) a register that rose more since the meter's last answer
        than the supply could deliver in that time (three times its maximum, plus 1 kWh:
        only what no installation draws): a corrupted answer must not become a bill. A new
        level that the next answer confirms is accepted."""
        # A clock step back at worst refuses one answer: the next is judged against it.
        now = self.now()
        last, c.last_raw = c.last_raw, (reading.energy_wh, now)
        if last is None:
            return
        hours = max((now - last[1]).total_seconds(), 0.0) / 3600 * self.meter_time_scale
        most = self.max_current_a * self.voltage_v * self.phases * hours * 3 + 1000.0
        if reading.energy_wh - last[0] > most:
            raise ProtocolError(
                f"energy register jumped from {last[0]:.0f} to {reading.energy_wh:.0f} Wh"
                f" in {hours * 3600:.0f} s, more than the supply can deliver: ignored"
            )

    async def read_meter(self, c: Connector) -> MeterReading | None:
        """Read the meter now; count misses; the connector is Faulted after the limit."""
        self.store.flush_if_due()  # (the meter polls are the store's clock, read or not)
        try:
            try:
                reading = await c.hw.meter.read()
            finally:
                raise_if_cancelling()  # a driver's library may have swallowed a cancellation
            self._check_plausible(c, reading)
        except TransientDriverError as exc:
            c.meter_misses += 1
            limit = int(self.cfg.hardware["meter_miss_limit"])
            if c.meter_misses == limit:
                log.error(
                    "connector %d: meter failed %d reads in a row (%s): reporting Faulted",
                    c.id,
                    limit,
                    exc,
                )
                c.meter_failed = True
                self._meter_lost(c)
            elif c.meter_misses < limit:
                log.warning("connector %d: meter read failed: %s", c.id, exc)
            return None
        except DriverError as exc:
            log.error("connector %d: meter unusable: %s", c.id, exc)
            c.meter_failed = True
            self._meter_lost(c)
            return None
        recovered = c.meter_failed
        if recovered:
            log.info("connector %d: meter answers again", c.id)
        c.meter_misses = 0
        c.meter_failed = False
        if recovered and c.tx is not None:
            self.spawn(self.actuate(c), "meter-back")
        c.reading, c.reading_at = reading, self.now()
        if c.tx is not None:
            c.tx.highest_wh = max(c.tx.highest_wh, energy_register_wh(reading))
            self.store.note_meter(c.tx.local_id, energy_register_wh(reading), iso(self.now()))
            self._check_invalid_energy(c, reading)
        self._refresh_status(c)
        return reading

    # ================================================================== status
    def _refresh_status(self, c: Connector) -> None:
        for other in self.reservations.update_flags():  # a reservation of connector 0
            if other is not c:
                self._refresh_status(other)
        inputs = c.inputs()
        status = derive_status(inputs)
        observed = (
            status.value,
            error_code(inputs),
            c.evse_status.vendor_code if status is Status.FAULTED and c.evse_status else None,
        )
        if observed == c.observed:
            return
        c.observed = observed
        if c.status_timer is not None:
            c.status_timer.cancel()
            c.status_timer = None
        delay = self.keys.get_int("MinimumStatusDuration")
        if delay > 0 and c.reported is not None:
            c.status_timer = asyncio.get_running_loop().call_later(delay, self._report_status, c)
        else:
            self._report_status(c)

    def _report_status(self, c: Connector) -> None:
        c.status_timer = None
        if c.observed is None or c.observed == c.reported:
            return
        c.reported = c.observed
        log.info("connector %d: %s (%s)", c.id, c.observed[0], c.observed[1])
        self.send_status(c.id)

    def status_of(self, connector_id: int) -> tuple[str, str, str | None]:
        if connector_id == 0:
            faulted = False
            status = connector_zero_status(operative=self.operative0, faulted=faulted)
            return status.value, "NoError", None
        c = self.connectors[connector_id]
        return c.observed or (Status.AVAILABLE.value, "NoError", None)

    def send_status(self, connector_id: int, *, triggered: bool = False) -> None:
        """Queue a StatusNotification with the connector's current status.

        Only once registered, unless the CSMS asked for it (TriggerMessage, allowed while
        the BootNotification is Pending).
        """
        if not self.registered and not triggered:
            return
        status, code, vendor = self.status_of(connector_id)
        payload: dict[str, Any] = {
            "connectorId": connector_id,
            "errorCode": code,
            "status": status,
            "timestamp": iso(self.now()),
        }
        if vendor:
            payload["vendorErrorCode"] = vendor
        self.outbox.send(Outgoing("StatusNotification", payload))

    def send_all_statuses(self) -> None:
        for connector_id in (0, *self.connectors):
            self.send_status(connector_id)

    # ================================================================== actuation
    def _tx_for_profiles(self, c: Connector) -> sc.Tx | None:
        if c.tx is None:
            return None
        return sc.Tx(self.store.csms_transaction_id(c.tx.local_id), c.tx.start)

    def _hardware_max_a(self, c: Connector) -> float:
        """The supply's limit, or the controller's when it is lower (it refuses more)."""
        return min(self.max_current_a, c.hw.evse.capabilities.max_current_a)

    def compute_limits(self) -> dict[int, float]:
        """Every connector's limit now (a ChargePointMaxProfile is shared between sessions)."""
        charging = sorted(
            (c for c in self.connectors.values() if c.tx is not None),
            key=lambda c: (c.tx.start if c.tx else self.now(), c.id),
        )
        return self.charging.limits(
            self.now(),
            {c.id: self._tx_for_profiles(c) for c in self.connectors.values()},
            hardware_max_a={c.id: self._hardware_max_a(c) for c in self.connectors.values()},
            charging=[c.id for c in charging],
        )

    def compute_limit(self, c: Connector) -> float:
        return self.compute_limits()[c.id]

    async def actuate(self, c: Connector) -> None:
        """Bring the controller in line with availability, transaction and limit."""
        async with c.actuate_lock:
            c.limit_a = self.compute_limit(c)
            if self.stopping:
                mode, current = ControlMode.PAUSED, None  # the agent winds down
            elif not c.operative or not self.operative0:
                mode, current = ControlMode.DISABLED, None
            elif (
                c.tx is None
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
                        log.info("connector %d: offering %.1f A", c.id, c.applied_current_a)
                    except CurrentNotApplied as exc:
                        # The controller's own decision (its range, its temperature): taken
                        # as it is, not repeated; the next change of state tries again.
                        c.applied_current_a = exc.applied_a
                        log.warning("connector %d: %s", c.id, exc)
                if mode is not c.applied_mode:
                    await {
                        ControlMode.ENABLED: evse.enable,
                        ControlMode.PAUSED: evse.pause,
                        ControlMode.DISABLED: evse.disable,
                    }[mode]()
                    c.applied_mode = mode
                    log.info("connector %d: controller %s", c.id, mode.value)
                    # Report from the controller's state after the command, not before it.
                    c.evse_status = await evse.read_status()
                c.actuate_failed = False
            except DriverError as exc:
                log.error("connector %d: could not command the controller (retrying in %.0f"
                          " s): %s", c.id, CONTROLLER_RETRY_S, exc)  # fmt: skip
                c.actuate_failed = True
                c.applied_mode, c.applied_current_a = None, None  # unknown: command it again
            c.paused_by_evse = c.tx is not None and (
                mode is ControlMode.PAUSED or c.applied_mode is ControlMode.PAUSED
            )
            self._refresh_status(c)
        self._arm_limit_timer()

    def _arm_limit_timer(self) -> None:
        """Recompute limits at the next profile boundary (a timer, not polling)."""
        if self._limit_timer is not None:
            self._limit_timer.cancel()
            self._limit_timer = None
        now = self.now()
        edge = self.charging.next_boundary(
            now, [c.tx.start if c.tx else None for c in self.connectors.values()]
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
        self.spawn(self._actuate_all(), "actuate-all")

    async def _actuate_all(self) -> None:
        """Actuate every connector, those whose current falls first: a ChargePointMaxProfile
        shared between connectors is not exceeded while they change one after the other."""
        limits = self.compute_limits()
        for c in sorted(self.connectors.values(), key=lambda c: limits[c.id] - c.offered_current_a):
            await self.actuate(c)

    async def _actuate_with_others(self, c: Connector, *, others_first: bool) -> None:
        """Actuate ``c`` after a transaction started (``others_first``) or stopped on it: the
        other sessions' share of a ChargePointMaxProfile changes too (smaller ones first)."""
        others = [o for o in self.connectors.values() if o is not c and o.tx is not None]
        if others_first:
            for other in others:
                await self.actuate(other)
        await self.actuate(c)
        if not others_first:
            for other in others:
                await self.actuate(other)

    # ================================================================== authorization
    async def authorize(self, id_tag: str) -> tuple[str, str | None]:
        """Return (status, parentIdTag) for ``id_tag``: online, the local list or cache
        when LocalPreAuthorize allows, else Authorize.req; offline (or when the request
        fails), the offline rules -- LocalAuthorizeOffline decides then, not
        LocalPreAuthorize (agent.auth)."""
        online = self.registered and self.outbox.online
        known = self.auth.pre_authorized(id_tag) if online else None
        if known is not None:
            return known.status, known.parent_id_tag
        if online:
            try:
                async with asyncio.timeout(float(self.cfg.csms["response_timeout_s"])):
                    result = await self.outbox.request("Authorize", {"idTag": id_tag})
                info = result.get("idTagInfo", {})
                self._remember(id_tag, info)
                return str(info.get("status", "Invalid")), info.get("parentIdTag")
            except (NotConnected, ConnectionError, TimeoutError) as exc:
                # Not sent, no answer, or the connection dropped while waiting.
                log.warning("Authorize for a tag failed (%s): deciding offline", exc)
            except Exception as exc:  # a CALLERROR from the CSMS
                log.warning("CSMS answered Authorize with an error: %s", exc)
                return "Invalid", None
        decided = self.auth.offline(id_tag)
        log.info("tag decided offline: %s (%s)", decided.status, decided.source)
        return decided.status, decided.parent_id_tag

    def _remember(self, id_tag: str, info: Any) -> None:
        self.auth.remember(id_tag, info)

    async def swipe(self, id_tag: str, connector_id: int | None = None) -> str:
        """An RFID card was presented. Returns what happened, for the CLI."""
        # A tag that owns a running transaction stops it (on the reader's connector, if the
        # reader belongs to one).
        here = [c for c in self.connectors.values() if connector_id is None or c.id == connector_id]
        for c in here:
            if c.tx is not None and c.tx.id_tag.casefold() == id_tag.casefold():
                await self.stop_transaction(c, "Local", id_tag=id_tag)
                return f"stopped the transaction on connector {c.id}"
        # So does a card of the same group: the same parentIdTag (OCPP 1.6 3.5.x).
        decided: tuple[str, str | None] | None = None
        if any(c.tx is not None and c.tx.parent_id_tag for c in here):
            decided = await self.authorize(id_tag)
            group = (decided[1] or "").casefold() if decided[0] == "Accepted" else ""
            for c in here:
                tx = c.tx
                if group and tx is not None and (tx.parent_id_tag or "").casefold() == group:
                    await self.stop_transaction(c, "Local", id_tag=id_tag)
                    return f"stopped the transaction on connector {c.id} (same group)"
        picked = self._pick_connector(connector_id, id_tag)
        if picked is None:
            return "no connector is free"
        c = picked
        status, parent = decided or await self.authorize(id_tag)
        if status != "Accepted":
            log.info("tag rejected: %s", status)
            return f"tag rejected ({status})"
        if c.tx is not None or c.starting:
            return f"connector {c.id} is busy"
        if not self.reservations.check_start(c, id_tag, parent)[0]:
            log.info("connector %d is reserved for another idTag", c.id)
            return f"connector {c.id} is reserved"
        if c.plugged:
            await self.start_transaction(c, id_tag, parent)
            return f"transaction started on connector {c.id}"
        self._wait_for_vehicle(c, id_tag, parent)
        return f"authorized: plug in on connector {c.id}"

    def _pick_connector(
        self, connector_id: int | None, id_tag: str | None = None
    ) -> Connector | None:
        if connector_id is not None:
            return self.connectors.get(connector_id)
        free = [c for c in self.connectors.values() if c.can_start]
        if id_tag is not None:
            # A connector reserved for this tag first; none reserved for another.
            mine = [c for c in free if (r := self.reservations.on_connector(c.id)) is not None
                    and r.held_by(id_tag, self.auth.parent_of(id_tag))]  # fmt: skip
            allowed = [c for c in free if not self.reservations.reserved_for_others(c, id_tag)]
            free = mine or allowed or free
        plugged = [c for c in free if c.plugged]
        candidates = plugged or free
        return candidates[0] if candidates else None

    def _wait_for_vehicle(self, c: Connector, id_tag: str, parent: str | None) -> None:
        self._clear_waiting(c)
        c.waiting_tag = (id_tag, parent)
        timeout = self.keys.get_int("ConnectionTimeOut")
        if timeout > 0:
            c.waiting_deadline = asyncio.get_running_loop().call_later(
                timeout, self._waiting_expired, c
            )
        self._refresh_status(c)

    def _waiting_expired(self, c: Connector) -> None:
        log.info("connector %d: no vehicle within ConnectionTimeOut: authorization dropped", c.id)
        c.waiting_deadline = None
        c.waiting_tag = None
        self._refresh_status(c)

    def _clear_waiting(self, c: Connector) -> None:
        if c.waiting_deadline is not None:
            c.waiting_deadline.cancel()
        c.waiting_deadline = None
        c.waiting_tag = None
        c.waiting_profile = None

    # ================================================================== transactions
    async def start_transaction(
        self,
        c: Connector,
        id_tag: str,
        parent: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> bool:
        """Start a transaction on ``c`` (vehicle plugged, tag authorized)."""
        if not c.can_start:
            log.warning("connector %d: cannot start a transaction now", c.id)
            return False
        c.starting = True  # no second start while the meter is read
        try:
            reading = await self.read_meter(c) or c.reading
        finally:
            c.starting = False
        if reading is None or not c.can_start:
            log.error("connector %d: no meter reading or not free any more: not starting",
                      c.id)  # fmt: skip
            return False
        allowed, reservation_id = self.reservations.check_start(c, id_tag, parent)
        if not allowed:
            log.warning("connector %d is reserved for another idTag: not starting", c.id)
            return False
        now = self.now()
        meter_start = energy_register_wh(reading)
        begin = self._stop_txn_sample(c, reading, "Transaction.Begin", now)
        payload = {
            "connectorId": c.id,
            "idTag": id_tag,
            "meterStart": meter_start,
            "timestamp": iso(now),
        }
        if reservation_id is not None:
            payload["reservationId"] = reservation_id
        local_id = self.store.begin_transaction(
            connector_id=c.id,
            id_tag=id_tag,
            meter_start_wh=meter_start,
            start_ts=iso(now),
            reservation_id=reservation_id,
            start_payload=payload,
        )
        self.reservations.consume(reservation_id, local_id)
        # The group, for a stop by another card of it: from the authorization, else what
        # the list or cache knows (a remote start without Authorize, an offline start);
        # StartTransaction.conf may tell it later (on_start_result).
        parent = parent or self.auth.parent_of(id_tag)
        c.tx = ActiveTx(local_id, id_tag, meter_start, now, begin, parent_id_tag=parent)
        c.finishing = False
        self._clear_waiting(c)
        log.info(
            "connector %d: transaction %d started, meterStart %d Wh", c.id, local_id, meter_start
        )
        self.outbox.notify_durable()
        if profile is not None:
            self._install_tx_profile_from_remote(c, profile)
        self._restart_sampler(c)
        await self._actuate_with_others(c, others_first=True)
        return True

    def _keep_for_stop(
        self,
        c: Connector,
        reading: MeterReading,
        context: str,
        key: str,
        at: datetime | None = None,
    ) -> None:
        """A value for StopTransaction's transactionData (StopTxnSampledData every
        MeterValueSampleInterval, StopTxnAlignedData every ClockAlignedDataInterval),
        within MAX_STOP_SAMPLE_BYTES."""
        tx = c.tx
        measurands = self.keys.get_list(key)
        taken = at or self.now()
        if tx is None or not measurands or taken < tx.start:
            return  # (an aligned instant before the transaction began is not part of it)
        values = self._sampled(c, reading, measurands, context)
        if not values:
            return
        sample = meter_value(iso(taken), values)
        tx.samples.append(sample)
        tx.samples_bytes += len(json.dumps(sample))
        while tx.samples_bytes > MAX_STOP_SAMPLE_BYTES and len(tx.samples) > 1:
            # Every other periodic sample first: the clock-aligned ones (time-of-use
            # billing) go only when nothing else is left to thin.
            periodic = [s for s in tx.samples if _context(s) == "Sample.Periodic"]
            if len(periodic) > 1:
                dropped = {id(s) for s in periodic[1::2]}
                tx.samples[:] = [s for s in tx.samples if id(s) not in dropped]
            else:
                tx.samples[:] = tx.samples[1::2]
            tx.samples_bytes = sum(len(json.dumps(s)) for s in tx.samples)

    def _stop_txn_sample(
        self, c: Connector, reading: MeterReading, context: str, now: datetime
    ) -> list[dict[str, Any]]:
        measurands = self.keys.get_list("StopTxnSampledData")
        if not measurands:
            return []
        values = self._sampled(c, reading, measurands, context)
        return [meter_value(iso(now), values)] if values else []

    def _last_register(self, c: Connector, context: str) -> list[dict[str, Any]]:
        """The energy register of the last good reading, stamped with when it was taken
        (a meter that stopped answering: its power or current then are not now's)."""
        if c.reading is None:
            return []
        values = self._sampled(c, c.reading, ["Energy.Active.Import.Register"], context)
        return [meter_value(iso(c.reading_at or self.now()), values)] if values else []

    def _sampled(
        self, c: Connector, reading: MeterReading, measurands: list[str], context: str
    ) -> list[dict[str, Any]]:
        return sampled_values(
            reading,
            measurands=measurands,
            context=context,
            offered_current_a=c.offered_current_a,
            nominal_voltage_v=self.voltage_v,
            phases=self.phases,
        )

    async def stop_transaction(
        self, c: Connector, reason: str, *, id_tag: str | None = None
    ) -> bool:
        tx = c.tx
        if tx is None or tx.stopping:
            return False
        tx.stopping = True
        fresh = await self.read_meter(c)
        reading = fresh or c.reading
        now = self.now()
        meter_stop = energy_register_wh(reading) if reading else tx.meter_start_wh
        floor = max(tx.meter_start_wh, tx.highest_wh)
        if meter_stop < floor:
            # A register below what this transaction already read is another meter, a
            # reset or a misread: never less energy than was delivered (and never a
            # negative one) for the CSMS to bill.
            log.warning("connector %d: meter register %d Wh is below %d Wh read earlier in"
                        " the transaction: using that", c.id, meter_stop, floor)  # fmt: skip
            meter_stop = floor
        if fresh is not None:
            end = self._stop_txn_sample(c, fresh, "Transaction.End", now)
        elif self.keys.get_list("StopTxnSampledData"):
            end = self._last_register(c, "Transaction.End")  # the meter does not answer:
        else:  # only its last register, as of when it was read
            end = []
        rec = TxRecord(
            tx.local_id, c.id, tx.id_tag, None, tx.meter_start_wh, iso(tx.start), None, None
        )
        c.tx = None
        self._stop_record(
            rec,
            meter_stop_wh=meter_stop,
            reason=reason,
            end_sample=tx.begin_sample + sorted(tx.samples, key=_taken_at) + end,
            id_tag=id_tag,
            now=now,
        )
        if c.sampler is not None:
            c.sampler.cancel()
            c.sampler = None
        c.finishing = c.plugged
        self.charging.end_transaction(c.id)  # a TxProfile ends with its transaction
        if c.pending_inoperative is not None:
            self._set_operative(c, c.pending_inoperative)
            c.pending_inoperative = None
        if self._pending_operative0 is not None and all(
            other.pending_inoperative is None for other in self.connectors.values()
        ):
            self._set_operative0(self._pending_operative0)
            self._pending_operative0 = None
        await self._actuate_with_others(c, others_first=False)
        return True

    def _stop_record(
        self,
        rec: TxRecord,
        *,
        meter_stop_wh: int,
        reason: str,
        end_sample: list[dict[str, Any]],
        id_tag: str | None = None,
        now: datetime | None = None,
    ) -> None:
        ts = iso(now or self.now())
        payload: dict[str, Any] = {
            "transactionId": 0,  # filled in from the StartTransaction result at delivery
            "meterStop": meter_stop_wh,
            "timestamp": ts,
            "reason": reason,
        }
        if id_tag is not None:
            payload["idTag"] = id_tag
        if end_sample:
            payload["transactionData"] = end_sample
        self.store.end_transaction(
            rec.local_id, meter_stop_wh=meter_stop_wh, stop_ts=ts, reason=reason,
            stop_payload=payload,
        )  # fmt: skip
        log.info(
            "transaction %d stopped (%s), meterStop %d Wh", rec.local_id, reason, meter_stop_wh
        )
        self.outbox.notify_durable()

    def on_start_result(self, local_id: int, result: dict[str, Any]) -> None:
        """StartTransaction.conf: record the CSMS id; act on a refused idTag."""
        csms_id = int(result["transactionId"])
        self.store.set_csms_transaction_id(local_id, csms_id)
        info = result.get("idTagInfo")
        status = info.get("status") if isinstance(info, dict) else None
        if status not in ID_TAG_STATUSES:
            # Only from an answer that breaks the schema: no verdict, so nothing changes.
            log.warning("transaction %d: the CSMS sent no usable idTagInfo (%.80r); charging"
                        " goes on as authorized", csms_id, info)  # fmt: skip
        else:
            id_tag = self.store.transaction_id_tag(local_id)
            if id_tag is not None:  # also when it already ended (started and stopped offline)
                self._remember(id_tag, info)
        for c in self.connectors.values():
            if c.tx is None or c.tx.local_id != local_id:
                continue
            if status == "Accepted" or status not in ID_TAG_STATUSES:
                group = info.get("parentIdTag") if isinstance(info, dict) else None
                if isinstance(group, str) and group:
                    c.tx.parent_id_tag = group  # the CSMS's word on the idTag's group
                self.spawn(self.actuate(c), "tx-id-known")  # TxProfiles may name the id
                continue
            log.warning("CSMS refused the idTag of transaction %d (%s)", csms_id, status)
            if self.keys.get_bool("StopTransactionOnInvalidId"):
                self.spawn(self.stop_transaction(c, "DeAuthorized"), "deauthorized")
            else:
                self._limit_invalid_energy(c, c.tx)

    def _limit_invalid_energy(self, c: Connector, tx: ActiveTx) -> None:
        """StopTransactionOnInvalidId is false: stop energy (SuspendedEVSE), keeping the
        transaction -- at once, or after MaxEnergyOnInvalidId Wh more (OCPP 1.6 9.1.16)."""
        allowance = self.keys.get_int("MaxEnergyOnInvalidId")
        usable = c.reading is not None and not c.meter_failed
        register = energy_register_wh(c.reading) if c.reading is not None else None
        if allowance > 0 and usable and register is not None:
            tx.invalid_energy_limit_wh = register + allowance
            log.warning(
                "connector %d: idTag invalid; charging on until the register reaches %d Wh"
                " (MaxEnergyOnInvalidId %d Wh)",
                c.id,
                tx.invalid_energy_limit_wh,
                allowance,
            )
            return
        tx.suspended_invalid = True
        self.spawn(self.actuate(c), "suspend-invalid")

    def _meter_lost(self, c: Connector) -> None:
        """The meter is Faulted: no energy until it answers again (nothing would bill it;
        the transaction stays, SuspendedEVSE). Energy allowed only up to a metered amount
        (MaxEnergyOnInvalidId) is over for good."""
        self._refresh_status(c)
        if c.tx is not None:
            log.warning("connector %d: meter lost while charging: energy paused", c.id)
            self.spawn(self.actuate(c), "meter-lost")
        tx = c.tx
        if tx is not None and tx.invalid_energy_limit_wh is not None and not tx.suspended_invalid:
            log.warning(
                "connector %d: meter lost while charging on an invalid idTag: suspending energy",
                c.id,
            )
            tx.suspended_invalid = True
            self.spawn(self.actuate(c), "suspend-invalid")

    def _check_invalid_energy(self, c: Connector, reading: MeterReading) -> None:
        tx = c.tx
        if tx is None or tx.invalid_energy_limit_wh is None or tx.suspended_invalid:
            return
        if energy_register_wh(reading) >= tx.invalid_energy_limit_wh:
            log.warning("connector %d: MaxEnergyOnInvalidId delivered: suspending energy", c.id)
            tx.suspended_invalid = True
            self.spawn(self.actuate(c), "suspend-invalid")

    # ================================================================== metering
    def _restart_sampler(self, c: Connector) -> None:
        if c.sampler is not None:
            c.sampler.cancel()
            c.sampler = None
        if c.tx is not None and self.keys.get_int("MeterValueSampleInterval") > 0:
            c.sampler = self.spawn(self._sample_loop(c), f"sampler-{c.id}")

    async def _sample_loop(self, c: Connector) -> None:
        interval = self.keys.get_int("MeterValueSampleInterval")
        while c.tx is not None:
            await asyncio.sleep(interval)
            if c.tx is None:
                return
            reading = await self.read_meter(c)
            if reading is None:
                continue  # no reading is invented
            self.queue_meter_values(c, reading, "Sample.Periodic", "MeterValuesSampledData")
            self._keep_for_stop(c, reading, "Sample.Periodic", "StopTxnSampledData")

    def queue_meter_values(
        self,
        c: Connector,
        reading: MeterReading,
        context: str,
        key: str,
        at: datetime | None = None,
    ) -> None:
        """Queue one MeterValues: durable with a transaction, volatile without."""
        values = self._sampled(c, reading, self.keys.get_list(key), context)
        if not values:
            return
        payload: dict[str, Any] = {
            "connectorId": c.id,
            "meterValue": [meter_value(iso(at or self.now()), values)],
        }
        if c.tx is not None:
            payload["transactionId"] = 0  # filled in at delivery
            self.store.enqueue("MeterValues", payload, c.tx.local_id)
            self.outbox.notify_durable()
            delay = self.store.flush_delay()
            if delay is not None:  # staged: to disk on time, also between slow meter polls
                if self._flush_timer is not None:
                    self._flush_timer.cancel()
                self._flush_timer = asyncio.get_running_loop().call_later(
                    delay + 0.01, self.store.flush_if_due
                )
        elif self.registered:
            self.outbox.send(Outgoing("MeterValues", payload))

    async def _aligned_loop(self) -> None:
        while True:
            interval = self.keys.get_int("ClockAlignedDataInterval")
            if interval <= 0:
                self._wake_aligned.clear()
                await self._wake_aligned.wait()
                continue
            now = self.now()
            next_at = next_aligned(now, interval)
            self._wake_aligned.clear()
            try:
                async with asyncio.timeout((next_at - now).total_seconds()):
                    await self._wake_aligned.wait()
                continue  # the interval changed: recompute
            except TimeoutError:
                pass
            for c in self.connectors.values():
                reading = await self.read_meter(c)
                if reading is not None:
                    # Stamped with the aligned instant the reading stands for.
                    self.queue_meter_values(
                        c, reading, "Sample.Clock", "MeterValuesAlignedData", next_at
                    )
                    self._keep_for_stop(c, reading, "Sample.Clock", "StopTxnAlignedData", next_at)

    def _on_key_changed(self, key: str, value: str) -> None:
        self.store.set_config(key, value)
        if key == "MeterValueSampleInterval":
            for c in self.connectors.values():
                self._restart_sampler(c)
        elif key == "ClockAlignedDataInterval":
            self._wake_aligned.set()

    # ================================================================== CSMS requests
    def remote_start(
        self, id_tag: str, connector_id: int | None, profile: dict[str, Any] | None
    ) -> str:
        if connector_id is not None and connector_id not in self.connectors:
            return "Rejected"
        c = self._pick_connector(connector_id, id_tag)
        if c is None or not c.can_start:
            return "Rejected"
        learn_parent = False
        if self.reservations.reserved_for_others(c, id_tag):
            # A reservation for a group (parentIdTag) whose idTag's parent is not known
            # here: the CSMS is asked (Authorize.req, OCPP 1.6 5.13) before deciding.
            learn_parent = (
                self.registered
                and self.outbox.online
                and self.reservations.group_may_hold(c)
                and self.auth.parent_of(id_tag) is None
                and self.auth.pre_authorized(id_tag) is None  # else nobody would be asked
            )
            if not learn_parent:
                log.info("RemoteStartTransaction rejected: connector %d is reserved", c.id)
                return "Rejected"
        if profile is not None and (problem := self.charging.remote_problem(c.id, profile)):
            log.warning("RemoteStartTransaction rejected: its charging profile: %s", problem)
            return "Rejected"
        c.starting = True  # taken until _remote_start has decided
        self.spawn(self._remote_start(c, id_tag, profile, learn_parent), f"remote-start-{c.id}")
        return "Accepted"

    async def _remote_start(
        self, c: Connector, id_tag: str, profile: dict[str, Any] | None, learn_parent: bool
    ) -> None:
        parent = None
        try:
            if self.keys.get_bool("AuthorizeRemoteTxRequests") or learn_parent:
                status, parent = await self.authorize(id_tag)
                if status != "Accepted":
                    log.info("remote start refused: idTag %s", status)
                    return
            if not self.reservations.check_start(c, id_tag, parent)[0]:
                log.info("remote start refused: connector %d is reserved for another"
                         " idTag", c.id)  # fmt: skip
                return
        finally:
            c.starting = False  # start_transaction (no await before its check) takes over
        if c.plugged:
            await self.start_transaction(c, id_tag, parent, profile)
        else:
            self._wait_for_vehicle(c, id_tag, parent)
            c.waiting_profile = profile

    def remote_stop(self, transaction_id: int) -> str:
        for c in self.connectors.values():
            if c.tx is not None and self.store.csms_transaction_id(c.tx.local_id) == (
                transaction_id
            ):
                self.spawn(self.stop_transaction(c, "Remote"), f"remote-stop-{c.id}")
                return "Accepted"
        return "Rejected"

    def change_availability(self, connector_id: int, operative: bool) -> str:
        if connector_id != 0 and connector_id not in self.connectors:
            return "Rejected"
        targets = (
            list(self.connectors.values()) if connector_id == 0 else [self.connectors[connector_id]]
        )
        scheduled = False
        for c in targets:
            if c.tx is not None and not operative:
                c.pending_inoperative = operative
                # On disk at once: after a restart (the transaction then closed with
                # PowerLoss or Reboot) the connector comes back Unavailable.
                self.store.put(f"availability.{c.id}", "Inoperative")
                scheduled = True
                continue
            c.pending_inoperative = None  # a later change overrides a scheduled one
            self._set_operative(c, operative)
        if connector_id == 0:
            if scheduled:
                # Connector 0 follows once the last transaction has stopped.
                self._pending_operative0 = operative
                self.store.put("availability.0", "Inoperative")
            else:
                self._pending_operative0 = None
                self._set_operative0(operative)
        self.actuate_all()
        return "Scheduled" if scheduled else "Accepted"

    def _set_operative0(self, operative: bool) -> None:
        self.operative0 = operative
        for c in self.connectors.values():
            c.charger_operative = operative
        self.store.put("availability.0", "Operative" if operative else "Inoperative")
        self.send_status(0)

    def _set_operative(self, c: Connector, operative: bool) -> None:
        c.operative = operative
        self.store.put(f"availability.{c.id}", "Operative" if operative else "Inoperative")

    async def unlock(self, connector_id: int) -> str:
        """UnlockConnector: stop the connector's transaction (UnlockCommand), then release
        the lock, and say whether that worked. NotSupported without a lock to drive."""
        c = self.connectors.get(connector_id)
        if c is None or not c.hw.evse.capabilities.supports_unlock:
            return "NotSupported"
        if c.tx is not None:
            await self.stop_transaction(c, "UnlockCommand")
        try:
            unlocked = await c.hw.evse.unlock()
        except DriverError as exc:
            log.error("connector %d: unlock failed: %s", c.id, exc)
            return "UnlockFailed"
        return "Unlocked" if unlocked else "UnlockFailed"

    def note_orderly_stop(self) -> None:
        """The agent is stopping on request (SIGTERM): see :meth:`_recover_transactions`."""
        self.store.put("reset.pending", "Stop")

    def reset(self, kind: str) -> str:
        self.spawn(self._reset(kind), "reset")
        return "Accepted"

    async def _reset(self, kind: str) -> None:
        reason = "SoftReset" if kind == "Soft" else "HardReset"
        for c in self.connectors.values():
            if c.tx is not None:
                await self.stop_transaction(c, reason)
        self.store.put("reset.pending", kind)
        # Give the sender a moment to deliver the StopTransaction (it stays queued anyway).
        await self._drain(timeout_s=5.0)
        log.warning("%s reset requested by the CSMS: restarting", kind)
        self._request_restart(kind)

    async def _drain(self, *, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and self.outbox.online:
            if self.store.queue_head() is None and not self.outbox.volatile:
                return
            await asyncio.sleep(0.05)

    def clear_cache(self) -> str:
        return self.auth.clear_cache()

    # ------------------------------------------------------------------ smart charging
    # The profiles live in ``self.charging`` (agent.charging); the station actuates.
    def set_charging_profile(self, connector_id: int, body: dict[str, Any]) -> str:
        if connector_id != 0 and connector_id not in self.connectors:
            return "Rejected"
        c = self.connectors.get(connector_id)
        tx = self._tx_for_profiles(c) if c is not None else None
        status = self.charging.set(connector_id, body, tx, now=self.now())
        if status == "Accepted":
            self.actuate_all()
        return status

    def composite_schedule(
        self, connector_id: int, duration_s: int, unit: str | None
    ) -> tuple[str, dict[str, Any]] | None:
        """GetCompositeSchedule: ``(scheduleStart, chargingSchedule)`` or None (Rejected).

        At most MAX_COMPOSITE_S ahead: the schedule is computed on the event loop, and a
        year of daily profiles would hold it (pilot, pings, watchdog) for seconds."""
        c = self.connectors.get(connector_id)
        return self.charging.composite(
            connector_id,
            self.now(),
            min(duration_s, MAX_COMPOSITE_S),
            unit,
            self._tx_for_profiles(c) if c is not None else None,
            hardware_max_a=self._hardware_max_a(c) if c is not None else None,
        )

    def _install_tx_profile_from_remote(self, c: Connector, body: dict[str, Any]) -> None:
        tx = self._tx_for_profiles(c)
        if tx is not None:
            self.charging.install_remote(c.id, body, tx)

    def clear_charging_profile(
        self,
        profile_id: int | None,
        connector_id: int | None,
        purpose: str | None,
        stack_level: int | None,
    ) -> str:
        status = self.charging.clear(profile_id, connector_id, purpose, stack_level)
        if status == "Accepted":
            self.actuate_all()
        return status

    # ------------------------------------------------------------------ triggers
    def trigger(self, message: str, connector_id: int | None) -> str:
        known = connector_id is None or connector_id in self.connectors
        if not known and not (
            connector_id == 0 and message in ("StatusNotification", "MeterValues")
        ):
            return "Rejected"
        return "Accepted"

    def send_triggered(self, message: str, connector_id: int | None) -> None:
        """Queue the message a TriggerMessage asked for (after the Accepted was sent)."""
        now = iso(self.now())
        if message == "BootNotification":
            self.request_boot()
        elif message == "Heartbeat":
            self.outbox.send(Outgoing("Heartbeat", {}))
        elif message == "StatusNotification":
            if connector_id is None:
                self.send_all_statuses_triggered()
            else:
                self.send_status(connector_id, triggered=True)
        elif message == "MeterValues":
            targets = (
                list(self.connectors.values())
                if connector_id in (None, 0)
                else [self.connectors[int(connector_id or 0)]]
            )
            for c in targets:
                reading = c.reading
                if reading is None:
                    continue
                if c.meter_failed:  # nothing current to say: the last register, as of then
                    meter_values = self._last_register(c, "Trigger")
                else:
                    values = self._sampled(
                        c, reading, self.keys.get_list("MeterValuesSampledData"), "Trigger"
                    ) or self._sampled(c, reading, ["Energy.Active.Import.Register"], "Trigger")
                    meter_values = [meter_value(now, values)]
                payload: dict[str, Any] = {"connectorId": c.id, "meterValue": meter_values}
                if c.tx is not None and (tx_id := self.store.csms_transaction_id(c.tx.local_id)):
                    payload["transactionId"] = tx_id
                self.outbox.send(Outgoing("MeterValues", payload))
        elif message == "DiagnosticsStatusNotification":
            self.outbox.send(Outgoing("DiagnosticsStatusNotification", {"status": "Idle"}))
        elif message == "FirmwareStatusNotification":
            self.outbox.send(Outgoing("FirmwareStatusNotification", {"status": "Idle"}))

    def send_all_statuses_triggered(self) -> None:
        for connector_id in (0, *self.connectors):
            self.send_status(connector_id, triggered=True)

    # ------------------------------------------------------------------ boot
    def boot_payload(self) -> dict[str, Any]:
        ident = self.cfg.identity
        payload: dict[str, Any] = {
            "chargePointVendor": ident["vendor"][:20],
            "chargePointModel": ident["model"][:20],
            "firmwareVersion": __version__,
        }
        optional = {
            "chargePointSerialNumber": ident["serial_number"][:25],
            "chargeBoxSerialNumber": ident["charge_box_serial_number"][:25],
            "meterType": ident["meter_type"][:25],
            "meterSerialNumber": ident["meter_serial_number"][:25],
            "iccid": ident["iccid"][:20],
            "imsi": ident["imsi"][:20],
        }
        payload.update({k: v for k, v in optional.items() if v})
        return payload

    # ------------------------------------------------------------------ diagnostics
    def snapshot(self) -> dict[str, Any]:
        """What ``evcp status --json`` prints."""
        pending, failed = self.store.queue_counts()
        connectors = []
        for c in self.connectors.values():
            reading = c.reading
            status, code, _vendor = self.status_of(c.id)
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
                    "transaction_id": (
                        self.store.csms_transaction_id(c.tx.local_id) if c.tx else None
                    ),
                    "meter_ok": not c.meter_failed,
                    "controller_firmware": c.hw.evse.capabilities.firmware,
                }
            )
        return {
            "version": __version__,
            "pid": os.getpid(),
            "csms": {
                "connected": self.connected,
                "registered": self.registered,
                "url": self.cfg.csms["url"],
                "charge_point_id": self.cfg.csms["charge_point_id"],
                "last_error": self.last_connect_error,
            },
            "queue": {"pending": pending, "failed": failed, "dropped": self.store.queue_dropped()},
            "storage": self.store.storage_status(),
            "local_list_version": self.auth.list_version(),
            "reservations": self.reservations.snapshot(),
            "clock": {"now": iso(self.now())},
            "connectors": connectors,
        }

    def failed_messages(self) -> list[dict[str, Any]]:
        """What ``evcp queue --json`` lists: the messages given up on, oldest first."""
        failed = []
        for seq, action, local_id, taken, error in self.store.queue_failed():
            failed.append(
                {
                    "seq": seq,
                    "action": action,
                    "local_transaction": local_id,
                    "transaction_id": (
                        None if local_id is None else self.store.csms_transaction_id(local_id)
                    ),
                    "taken_at": taken,
                    "last_error": error,
                }
            )
        return failed

    def retry_failed_messages(self) -> int:
        """``evcp queue retry``: every message given up on goes back into the queue, in
        its place, with TransactionMessageAttempts new tries; sending starts at once."""
        count = self.store.queue_retry_failed()
        if count:
            log.warning("%d failed transaction message(s) put back in the queue", count)
            self.send_queue_now()
        return count


AsyncFn = Callable[[], Awaitable[None]]
