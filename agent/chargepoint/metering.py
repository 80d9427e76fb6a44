"""Metering: meter polls, plausibility, periodic and clock-aligned MeterValues.

MeterValues of a transaction go to the store's durable queue (staged in RAM first when
``queue_flush_s`` > 0, with a timer taking them to disk on time); outside a transaction
they are volatile. StopTxnSampledData/StopTxnAlignedData values are kept on the running
transaction for its StopTransaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from agent.aio import raise_if_cancelling
from agent.chargepoint.logfields import connector_fields
from agent.chargepoint.model import Connector
from agent.core.metering import energy_register_wh, meter_value, sampled_values
from agent.core.timefmt import iso
from agent.logs import FailureLog
from agent.outbox import Outgoing
from drivers.base import DriverError, MeterReading, ProtocolError, TransientDriverError

if TYPE_CHECKING:  # (annotations only: the protocol costs memory at run time)
    from agent.chargepoint.hub import Hub

log = logging.getLogger("evcp.station")

#: The most bytes (as JSON) of StopTxnSampledData/StopTxnAlignedData values one
#: StopTransaction carries: beyond, every other value goes (coarser, never bigger). Many
#: CSMS stacks refuse WebSocket frames over 64 KiB.
MAX_STOP_SAMPLE_BYTES = 16_000


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


class Metering:
    """The station's metering part."""

    def __init__(self, station: Hub) -> None:
        self.st = station
        self._flush_timer: asyncio.TimerHandle | None = None  # staged MeterValues to disk
        self._wake_aligned = asyncio.Event()
        #: Per connector: a failed meter is logged once, reminded every 10 min, and once
        #: when it answers again (not on every poll).
        self._failure_logs: dict[int, FailureLog] = {}

    def failure_log(self, c: Connector) -> FailureLog:
        """``c``'s meter failure log, its journald fields as of now."""
        flog = self._failure_logs.get(c.id)
        if flog is None:
            flog = self._failure_logs[c.id] = FailureLog(log, f"connector {c.id}: meter")
        flog.fields = connector_fields(self.st.store, c)
        return flog

    def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # (the store is closed next: it flushes then)

    async def poll_meter(self, c: Connector) -> None:
        while True:
            await self.read_meter(c)
            await asyncio.sleep(float(self.st.cfg.hardware["meter_poll_s"]))

    def _check_plausible(self, c: Connector, reading: MeterReading) -> None:
        """Refuse (as a misread) a register that rose more since the meter's last answer
        than the supply could deliver in that time (three times its maximum, plus 1 kWh:
        only what no installation draws): a corrupted answer must not become a bill. A new
        level that the next answer confirms is accepted."""
        # A clock step back at worst refuses one answer: the next is judged against it.
        st = self.st
        now = st.now()
        last, c.last_raw = c.last_raw, (reading.energy_wh, now)
        if last is None:
            return
        hours = max((now - last[1]).total_seconds(), 0.0) / 3600 * st.meter_time_scale
        most = st.max_current_a * st.voltage_v * st.phases * hours * 3 + 1000.0
        if reading.energy_wh - last[0] > most:
            raise ProtocolError(
                f"energy register jumped from {last[0]:.0f} to {reading.energy_wh:.0f} Wh"
                f" in {hours * 3600:.0f} s, more than the supply can deliver: ignored"
            )

    async def read_meter(self, c: Connector) -> MeterReading | None:
        """Read the meter now; count misses; the connector is Faulted after the limit."""
        st = self.st
        st.store.flush_if_due()  # (the meter polls are the store's clock, read or not)
        try:
            try:
                reading = await c.hw.meter.read()
            finally:
                raise_if_cancelling()  # a driver's library may have swallowed a cancellation
            self._check_plausible(c, reading)
        except TransientDriverError as exc:
            c.meter_misses += 1
            limit = int(st.cfg.hardware["meter_miss_limit"])
            if c.meter_misses >= limit:
                # Once at the limit (Faulted), then a reminder every 10 minutes.
                self.failure_log(c).failed(
                    time.monotonic(), f"{exc} ({limit} reads in a row failed: Faulted)"
                )
                if c.meter_misses == limit:
                    c.meter_failed = True
                    st.transactions.meter_lost(c)
            else:
                log.warning("connector %d: meter read failed: %s", c.id, exc,
                            extra=connector_fields(st.store, c))  # fmt: skip
            return None
        except DriverError as exc:
            c.meter_misses += 1  # (what `evcp status` counts)
            self.failure_log(c).failed(time.monotonic(), f"unusable: {exc} (Faulted)")
            if not c.meter_failed:
                c.meter_failed = True
                st.transactions.meter_lost(c)
            return None
        recovered = c.meter_failed
        known = self._failure_logs.get(c.id)
        if known is not None and known.failing:
            self.failure_log(c).ok(time.monotonic())
        c.meter_misses = 0
        c.meter_failed = False
        if recovered and c.tx is not None:
            st.spawn(st.actuate(c), "meter-back")
        c.reading, c.reading_at = reading, st.now()
        if c.tx is not None:
            c.tx.highest_wh = max(c.tx.highest_wh, energy_register_wh(reading))
            st.store.note_meter(c.tx.local_id, energy_register_wh(reading), iso(st.now()))
            st.transactions.check_invalid_energy(c, reading)
        st.refresh_status(c)
        return reading

    # ------------------------------------------------------------------ sampled values
    def sampled(
        self, c: Connector, reading: MeterReading, measurands: list[str], context: str
    ) -> list[dict[str, Any]]:
        st = self.st
        return sampled_values(
            reading,
            measurands=measurands,
            context=context,
            offered_current_a=c.offered_current_a,
            nominal_voltage_v=st.voltage_v,
            phases=st.phases,
        )

    def stop_txn_sample(
        self, c: Connector, reading: MeterReading, context: str, now: datetime
    ) -> list[dict[str, Any]]:
        measurands = self.st.keys.get_list("StopTxnSampledData")
        if not measurands:
            return []
        values = self.sampled(c, reading, measurands, context)
        return [meter_value(iso(now), values)] if values else []

    def last_register(self, c: Connector, context: str) -> list[dict[str, Any]]:
        """The energy register of the last good reading, stamped with when it was taken
        (a meter that stopped answering: its power or current then are not now's)."""
        if c.reading is None:
            return []
        values = self.sampled(c, c.reading, ["Energy.Active.Import.Register"], context)
        return [meter_value(iso(c.reading_at or self.st.now()), values)] if values else []

    def triggered_meter_values(self, c: Connector) -> list[dict[str, Any]]:
        """MeterValue entries for a TriggerMessage(MeterValues)."""
        reading = c.reading
        if reading is None:
            return []
        if c.meter_failed:  # nothing current to say: the last register, as of then
            return self.last_register(c, "Trigger")
        keys = self.st.keys
        values = self.sampled(
            c, reading, keys.get_list("MeterValuesSampledData"), "Trigger"
        ) or self.sampled(c, reading, ["Energy.Active.Import.Register"], "Trigger")
        return [meter_value(iso(self.st.now()), values)]

    def keep_for_stop(
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
        measurands = self.st.keys.get_list(key)
        taken = at or self.st.now()
        if tx is None or not measurands or taken < tx.start:
            return  # (an aligned instant before the transaction began is not part of it)
        values = self.sampled(c, reading, measurands, context)
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

    # ------------------------------------------------------------------ loops
    def restart_sampler(self, c: Connector) -> None:
        if c.sampler is not None:
            c.sampler.cancel()
            c.sampler = None
        if c.tx is not None and self.st.keys.get_int("MeterValueSampleInterval") > 0:
            c.sampler = self.st.spawn(self._sample_loop(c), f"sampler-{c.id}")

    async def _sample_loop(self, c: Connector) -> None:
        interval = self.st.keys.get_int("MeterValueSampleInterval")
        while c.tx is not None:
            await asyncio.sleep(interval)
            if c.tx is None:
                return
            reading = await self.read_meter(c)
            if reading is None:
                continue  # no reading is invented
            self.queue_meter_values(c, reading, "Sample.Periodic", "MeterValuesSampledData")
            self.keep_for_stop(c, reading, "Sample.Periodic", "StopTxnSampledData")

    def queue_meter_values(
        self,
        c: Connector,
        reading: MeterReading,
        context: str,
        key: str,
        at: datetime | None = None,
    ) -> None:
        """Queue one MeterValues: durable with a transaction, volatile without."""
        st = self.st
        values = self.sampled(c, reading, st.keys.get_list(key), context)
        if not values:
            return
        payload: dict[str, Any] = {
            "connectorId": c.id,
            "meterValue": [meter_value(iso(at or st.now()), values)],
        }
        if c.tx is not None:
            payload["transactionId"] = 0  # filled in at delivery
            st.store.enqueue("MeterValues", payload, c.tx.local_id)
            st.outbox.notify_durable()
            delay = st.store.flush_delay()
            if delay is not None:  # staged: to disk on time, also between slow meter polls
                if self._flush_timer is not None:
                    self._flush_timer.cancel()
                self._flush_timer = asyncio.get_running_loop().call_later(
                    delay + 0.01, st.store.flush_if_due
                )
        elif st.registered:
            st.outbox.send(Outgoing("MeterValues", payload))

    async def aligned_loop(self) -> None:
        while True:
            interval = self.st.keys.get_int("ClockAlignedDataInterval")
            if interval <= 0:
                self._wake_aligned.clear()
                await self._wake_aligned.wait()
                continue
            now = self.st.now()
            next_at = next_aligned(now, interval)
            self._wake_aligned.clear()
            try:
                async with asyncio.timeout((next_at - now).total_seconds()):
                    await self._wake_aligned.wait()
                continue  # the interval changed: recompute
            except TimeoutError:
                pass
            for c in self.st.connectors.values():
                reading = await self.read_meter(c)
                if reading is not None:
                    # Stamped with the aligned instant the reading stands for.
                    self.queue_meter_values(
                        c, reading, "Sample.Clock", "MeterValuesAlignedData", next_at
                    )
                    self.keep_for_stop(c, reading, "Sample.Clock", "StopTxnAlignedData", next_at)

    def on_key_changed(self, key: str) -> None:
        if key == "MeterValueSampleInterval":
            for c in self.st.connectors.values():
                self.restart_sampler(c)
        elif key == "ClockAlignedDataInterval":
            self._wake_aligned.set()
