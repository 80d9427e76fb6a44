"""The charge point proper: connectors, their hardware, status and availability.

The :class:`Station` turns hardware events (EVSE controller, meter) and local events (an
RFID swipe) into hardware commands and OCPP messages, with three parts of its own:
:class:`~agent.chargepoint.transactions.Transactions`,
:class:`~agent.chargepoint.metering.Metering` and
:class:`~agent.chargepoint.actuation.Actuation`. It never touches the WebSocket: outgoing
messages go to the :class:`Outbox` (volatile) or to the store's durable queue
(transaction messages), and the session's single sender delivers them.

The feature profiles (``agent.features``) reach it only through
:class:`~agent.chargepoint.port.ChargePointPort`, which it implements; it sees them only
through the port module's small protocols (limits, tag authority, start guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.chargepoint.actuation import Actuation
from agent.chargepoint.logfields import connector_fields
from agent.chargepoint.metering import Metering
from agent.chargepoint.model import PLUGGED, Clock, Connector, ConnectorHardware
from agent.chargepoint.transactions import Transactions
from agent.config import Config
from agent.core import availability
from agent.core import smart_charging as sc
from agent.core.config_keys import ConfigKeys
from agent.core.connector import Status, connector_zero_status, derive_status, error_code
from agent.core.timefmt import iso
from agent.logs import FailureLog
from agent.outbox import Outbox, Outgoing
from agent.store import Store
from drivers.base import ControlMode, DriverError, EvseStatus, MeterReading, VehicleState

if TYPE_CHECKING:  # (annotations only: the protocols cost memory at run time)
    from agent.chargepoint.port import LimitSource, StartGuard, TagAuthority

log = logging.getLogger("evcp.station")

#: Seconds between attempts to start an EVSE controller that did not start, or to repeat
#: a command to it that failed.
CONTROLLER_RETRY_S = 5.0


class NoReservations:
    """A :class:`StartGuard` with no reservations: everybody may start anywhere."""

    def check_start(
        self, c: Connector, id_tag: str, parent_id_tag: str | None
    ) -> tuple[bool, int | None]:
        return True, None

    def consume(self, reservation_id: int | None, transaction: int) -> None:
        return None

    def held_for(self, c: Connector, id_tag: str) -> bool:
        return False

    def reserved_for_others(self, c: Connector, id_tag: str) -> bool:
        return False

    def update_flags(self) -> list[Connector]:
        return []


class Station:
    """The charge point. Create, ``await start()``, then run ``run()`` in a TaskGroup.

    Args:
        limits: the smart-charging profiles (``agent.features.smart_charging``).
        tags: the local list and cache (``agent.features.local_auth_list``).
    The reservations' :class:`StartGuard` is set afterwards (``guard``), as it needs the
    station itself.
    """

    def __init__(
        self,
        *,
        cfg: Config,
        store: Store,
        keys: ConfigKeys,
        clock: Clock,
        hardware: list[ConnectorHardware],
        request_restart: Callable[[str], None],
        limits: LimitSource,
        tags: TagAuthority,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.clock = clock
        self.limits = limits
        self.tags = tags
        self.guard: StartGuard = NoReservations()
        self.outbox = Outbox()
        self.connectors = {i + 1: Connector(i + 1, hw) for i, hw in enumerate(hardware)}
        self.registered = False  # BootNotification accepted in this process
        self.connected = False
        self.last_connect_error: str | None = None
        self.operative0 = self.store.get("availability.0", "Operative") == "Operative"
        self._pending_operative0: bool | None = None  # Scheduled change of connector 0
        self._request_restart = request_restart
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle_callbacks: list[Callable[[], None]] = []
        #: A controller that does not answer: logged once, reminded every 10 min, and once
        #: when it answers again (the supervisor retries every CONTROLLER_RETRY_S).
        self._controller_logs = {
            c.id: FailureLog(log, f"connector {c.id}: EVSE controller")
            for c in self.connectors.values()
        }
        #: Set by the session: queue a BootNotification now (TriggerMessage).
        self.request_boot: Callable[[], None] = lambda: None
        #: Set by the session: send the queue's head now, whatever retry delay it waits on.
        self.send_queue_now: Callable[[], None] = lambda: None
        #: The agent is stopping: controllers are paused and stay paused.
        self.stopping = False
        #: start() has closed what a power loss left open: a plug-in may start a transaction
        #: (before, a car already plugged in would open a second one beside the old).
        self.ready = False
        self.max_current_a = float(cfg.hardware["max_current_a"])
        self.voltage_v = float(cfg.hardware["nominal_voltage_v"])
        self.phases = int(cfg.hardware["phases"])
        #: Simulated seconds per real second of the simulated meter (1 on real hardware):
        #: how fast its register may plausibly rise.
        self.meter_time_scale = 1.0
        if cfg.hardware.get("driver") == "sim":
            self.meter_time_scale = float(getattr(cfg, "sim", {}).get("time_scale", 1.0))
        self.transactions = Transactions(self)
        self.metering = Metering(self)
        self.actuation = Actuation(self)
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

    def controller_retry_s(self) -> float:
        return CONTROLLER_RETRY_S

    async def start(self, *, before_first_status: Callable[[], None] = lambda: None) -> None:
        """Start the drivers, close what a power loss left open, report each connector.

        ``before_first_status`` runs once the connectors are known and before the first
        status is derived (the reservations load there)."""
        for c in self.connectors.values():
            c.operative = self.store.get(f"availability.{c.id}", "Operative") == "Operative"
            c.charger_operative = self.operative0
            c.hw.evse.set_listener(functools.partial(self._on_evse_status, c))
            try:
                await c.hw.evse.start()
                c.controller_up = True
                c.evse_status = await c.hw.evse.read_status()
            except DriverError as exc:
                self.controller_log(c).failed(
                    time.monotonic(), f"{exc} (retrying every {CONTROLLER_RETRY_S:.0f} s)"
                )
            try:
                await c.hw.meter.connect()
                c.reading = await c.hw.meter.read()
                c.reading_at = self.now()
            except DriverError as exc:
                self.metering.failure_log(c).failed(time.monotonic(), f"unavailable: {exc}")
        self.transactions.recover()
        before_first_status()
        self.ready = True
        for c in self.connectors.values():
            await self.actuate(c)
            self.refresh_status(c)
            self._free_vend(c)  # a car left plugged in (a power cut): charging resumes

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
                log.info(
                    "connector %d: controller paused (the agent stops)",
                    c.id,
                    extra=connector_fields(self.store, c),
                )
            except (DriverError, TimeoutError) as exc:
                log.error("connector %d: could not pause the controller at exit: %s",
                          c.id, exc, extra=connector_fields(self.store, c))  # fmt: skip

    async def close(self) -> None:
        self.metering.close()
        self.actuation.close()
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
                group.create_task(self.metering.poll_meter(c), name=f"meter-{c.id}")
                group.create_task(self._supervise_controller(c), name=f"controller-{c.id}")
            group.create_task(self.metering.aligned_loop(), name="aligned")

    def controller_log(self, c: Connector) -> FailureLog:
        """``c``'s controller failure log, its journald fields as of now."""
        flog = self._controller_logs[c.id]
        flog.fields = connector_fields(self.store, c)
        return flog

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
                    self.controller_log(c).ok(time.monotonic())
                    self.refresh_status(c)
                except DriverError as exc:
                    self.controller_log(c).failed(
                        time.monotonic(), f"{exc} (retrying every {CONTROLLER_RETRY_S:.0f} s)"
                    )
                    continue
                c.applied_mode, c.applied_current_a = None, None  # command it afresh
                await self.actuate(c)
            elif c.actuate_failed:
                await self.actuate(c)

    def note_orderly_stop(self) -> None:
        """The agent is stopping on request (SIGTERM): see ``Transactions.recover``."""
        self.store.put("reset.pending", "Stop")

    def note_reset(self, kind: str) -> None:
        self.store.put("reset.pending", kind)

    def request_restart(self, kind: str) -> None:
        self._request_restart(kind)

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
                extra=connector_fields(self.store, c),
            )
        if c.plugged and not was_plugged:
            self._on_plugged(c)
        elif known in PLUGGED and status.vehicle is VehicleState.ABSENT:
            self._on_unplugged(c)
        self.refresh_status(c)

    def _on_plugged(self, c: Connector) -> None:
        if not self.ready:
            return  # (start() looks at every connector once it is ready)
        if c.waiting_tag is not None and c.tx is None:
            tag, parent = c.waiting_tag
            profile = c.waiting_profile
            self.transactions.clear_waiting(c)
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
        if not self.guard.check_start(c, tag, None)[0]:
            log.info(
                "connector %d: car plugged in, but reserved for another idTag",
                c.id,
                extra=connector_fields(self.store, c),
            )
            return
        log.info(
            "connector %d: car plugged in: starting (free vend)",
            c.id,
            extra=connector_fields(self.store, c),
        )
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
                            " unplugged", c.id, extra=connector_fields(self.store, c))  # fmt: skip
        except DriverError as exc:
            log.error("connector %d: could not open the cable lock after the EV was"
                      " unplugged: %s", c.id, exc, extra=connector_fields(self.store, c))  # fmt: skip

    # ================================================================== status
    def refresh_status(self, c: Connector) -> None:
        self.run_idle_callbacks()
        if c.tx is not None and c.tx.stopping:
            # The stop pauses the controller first: the EV's reaction is no status of
            # its own (no SuspendedEV before Finishing); the status follows the stop.
            return
        for other in self.guard.update_flags():  # a reservation of connector 0
            if other is not c:
                self.refresh_status(other)
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
        log.info(
            "connector %d: %s (%s)",
            c.id,
            c.observed[0],
            c.observed[1],
            extra=connector_fields(self.store, c),
        )
        self.send_status(c.id)

    def status_of(self, connector_id: int) -> tuple[str, str, str | None]:
        if connector_id == 0:
            status = connector_zero_status(operative=self.operative0, faulted=False)
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

    def report_start_failure(self, c: Connector, info: str) -> None:
        """A transaction that was to start (a RemoteStartTransaction already answered
        Accepted, a tag, free vend) could not: the CSMS is told with a StatusNotification
        of the connector's status with errorCode OtherError and ``info`` (OCPP 1.6 4.9:
        an error that does not change the status), then the status again with NoError
        (the error was an event, not a state). The status itself is derived again first:
        Available once nothing holds the connector, Preparing while a vehicle is plugged."""
        self.refresh_status(c)
        if not self.registered:
            return
        status, _code, _vendor = self.status_of(c.id)
        payload: dict[str, Any] = {
            "connectorId": c.id,
            "errorCode": "OtherError",
            "info": info[:50],
            "status": status,
            "timestamp": iso(self.now()),
        }
        self.outbox.send(Outgoing("StatusNotification", payload))
        self.send_status(c.id)

    def send_all_statuses(self) -> None:
        for connector_id in (0, *self.connectors):
            self.send_status(connector_id)

    # ================================================================== availability
    def change_availability(self, connector_id: int, operative: bool) -> str:
        running = {c.id: c.tx is not None for c in self.connectors.values()}
        plan = availability.change(connector_id, operative, running)
        if plan.status == "Rejected":
            return plan.status
        for cid, value in plan.scheduled.items():
            if cid == 0:
                self._pending_operative0 = value
            else:
                self.connectors[cid].pending_inoperative = value
            # On disk at once: after a restart (the transaction then closed with
            # PowerLoss or Reboot) the connector comes back Unavailable.
            self.store.put(f"availability.{cid}", "Inoperative")
        for cid, value in plan.now.items():
            if cid == 0:
                self._pending_operative0 = None
                self._set_operative0(value)
            else:
                self.connectors[cid].pending_inoperative = None  # a later change overrides
                self._set_operative(self.connectors[cid], value)
        self.actuate_all()
        return plan.status

    def apply_pending_availability(self, c: Connector) -> None:
        """A transaction ended on ``c``: a Scheduled availability change takes effect."""
        pending = {
            other.id: other.pending_inoperative
            for other in self.connectors.values()
            if other.pending_inoperative is not None
        }
        if self._pending_operative0 is not None:
            pending[0] = self._pending_operative0
        for cid, value in availability.after_transaction(c.id, pending).items():
            if cid == 0:
                self._set_operative0(value)
                self._pending_operative0 = None
            else:
                self._set_operative(self.connectors[cid], value)
                self.connectors[cid].pending_inoperative = None

    def _set_operative0(self, operative: bool) -> None:
        self.operative0 = operative
        for c in self.connectors.values():
            c.charger_operative = operative
        self.store.put("availability.0", "Operative" if operative else "Inoperative")
        self.send_status(0)

    def _set_operative(self, c: Connector, operative: bool) -> None:
        c.operative = operative
        self.store.put(f"availability.{c.id}", "Operative" if operative else "Inoperative")

    def block_charging(self, blocked: bool, reason: str = "") -> None:
        """While ``blocked``, no new transaction starts and idle connectors report
        Unavailable (a firmware update installs); running ones go on."""
        for c in self.connectors.values():
            if c.blocked != blocked:
                c.blocked = blocked
                self.refresh_status(c)
        if blocked:
            log.warning("no new transactions: %s", reason or "charging blocked")
        else:
            log.info("new transactions allowed again")

    # ================================================================== idle
    def idle(self) -> bool:
        """No transaction is running or starting on any connector."""
        return all(c.tx is None and not c.starting for c in self.connectors.values())

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (soon) once no transaction is running or starting."""
        self._idle_callbacks.append(callback)
        self.run_idle_callbacks()

    def run_idle_callbacks(self) -> None:
        if not self._idle_callbacks or not self.idle():
            return
        callbacks, self._idle_callbacks = self._idle_callbacks, []
        loop = asyncio.get_running_loop()
        for callback in callbacks:
            loop.call_soon(callback)

    # ================================================================== the port's parts
    async def actuate(self, c: Connector) -> None:
        await self.actuation.actuate(c)
        self.run_idle_callbacks()

    def actuate_all(self) -> None:
        self.actuation.actuate_all()

    def tx_for_profiles(self, c: Connector | None) -> sc.Tx | None:
        return self.actuation.tx_for_profiles(c)

    def hardware_max_a(self, c: Connector) -> float:
        return self.actuation.hardware_max_a(c)

    def csms_transaction_id(self, c: Connector) -> int | None:
        return None if c.tx is None else self.store.csms_transaction_id(c.tx.local_id)

    async def read_meter(self, c: Connector) -> MeterReading | None:
        return await self.metering.read_meter(c)

    def triggered_meter_values(self, c: Connector) -> list[dict[str, Any]]:
        return self.metering.triggered_meter_values(c)

    async def authorize(self, id_tag: str) -> tuple[str, str | None]:
        return await self.transactions.authorize(id_tag)

    async def swipe(self, id_tag: str, connector_id: int | None = None) -> str:
        return await self.transactions.swipe(id_tag, connector_id)

    def pick_connector(
        self, connector_id: int | None, id_tag: str | None = None
    ) -> Connector | None:
        return self.transactions.pick_connector(connector_id, id_tag)

    def wait_for_vehicle(
        self, c: Connector, id_tag: str, parent: str | None, profile: dict[str, Any] | None = None
    ) -> None:
        self.transactions.wait_for_vehicle(c, id_tag, parent, profile)

    async def start_transaction(
        self,
        c: Connector,
        id_tag: str,
        parent: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> bool:
        return await self.transactions.start_transaction(c, id_tag, parent, profile)

    async def stop_transaction(
        self, c: Connector, reason: str, *, id_tag: str | None = None
    ) -> bool:
        return await self.transactions.stop_transaction(c, reason, id_tag=id_tag)

    def on_start_result(self, local_id: int, result: dict[str, Any]) -> None:
        self.transactions.on_start_result(local_id, result)

    def _on_key_changed(self, key: str, value: str) -> None:
        self.store.set_config(key, value)
        self.metering.on_key_changed(key)
