"""Transactions: authorization of a tag, start, stop, and what the CSMS says of them.

StartTransaction and StopTransaction are committed to the store's durable queue (fsync'd)
before they are sent; the session's sender delivers them in order.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.chargepoint.logfields import connector_fields, transaction_fields, transaction_name
from agent.chargepoint.model import ID_TAG_STATUSES, ActiveTx, Connector
from agent.core.metering import energy_register_wh
from agent.core.timefmt import iso
from agent.outbox import NotConnected
from agent.store import TxRecord
from drivers.base import MeterReading

if TYPE_CHECKING:  # (annotations only: the protocol costs memory at run time)
    from agent.chargepoint.hub import Hub

log = logging.getLogger("evcp.station")


def _taken_at(sample: dict[str, Any]) -> str:
    return str(sample["timestamp"])


class Transactions:
    """The station's transaction part."""

    def __init__(self, station: Hub) -> None:
        self.st = station

    # ------------------------------------------------------------------ authorization
    async def authorize(self, id_tag: str) -> tuple[str, str | None]:
        """Return (status, parentIdTag) for ``id_tag``: online, the local list or cache
        when LocalPreAuthorize allows, else Authorize.req; offline (or when the request
        fails), the offline rules -- LocalAuthorizeOffline decides then, not
        LocalPreAuthorize (agent.features.local_auth_list)."""
        st = self.st
        online = st.registered and st.outbox.online
        known = st.tags.pre_authorized(id_tag) if online else None
        if known is not None:
            return known.status, known.parent_id_tag
        if online:
            try:
                async with asyncio.timeout(float(st.cfg.csms["response_timeout_s"])):
                    result = await st.outbox.request("Authorize", {"idTag": id_tag})
                info = result.get("idTagInfo", {})
                st.tags.remember(id_tag, info)
                return str(info.get("status", "Invalid")), info.get("parentIdTag")
            except (NotConnected, ConnectionError, TimeoutError, ValueError) as exc:
                # Not sent (offline, or a request that cannot be sent: ValueError), no
                # answer, or the connection dropped while waiting: the CSMS did not refuse.
                log.warning("Authorize for a tag failed (%s): deciding offline", exc)
            except Exception as exc:  # a CALLERROR from the CSMS
                log.warning("CSMS answered Authorize with an error: %s", exc)
                return "Invalid", None
        decided = st.tags.offline(id_tag)
        log.info("tag decided offline: %s (%s)", decided.status, decided.source)
        return decided.status, decided.parent_id_tag

    async def swipe(self, id_tag: str, connector_id: int | None = None) -> str:
        """An RFID card was presented. Returns what happened, for the CLI."""
        st = self.st
        # A tag that owns a running transaction stops it (on the reader's connector, if the
        # reader belongs to one).
        here = [c for c in st.connectors.values() if connector_id is None or c.id == connector_id]
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
        picked = self.pick_connector(connector_id, id_tag)
        if picked is None:
            return "no connector is free"
        c = picked
        status, parent = decided or await self.authorize(id_tag)
        if status != "Accepted":
            log.info("tag rejected: %s", status)
            return f"tag rejected ({status})"
        if c.tx is not None or c.starting:
            return f"connector {c.id} is busy"
        if not st.guard.check_start(c, id_tag, parent)[0]:
            log.info("connector %d is reserved for another idTag", c.id,
                     extra=connector_fields(st.store, c))  # fmt: skip
            return f"connector {c.id} is reserved"
        if c.plugged:
            await self.start_transaction(c, id_tag, parent)
            return f"transaction started on connector {c.id}"
        self.wait_for_vehicle(c, id_tag, parent)
        return f"authorized: plug in on connector {c.id}"

    def pick_connector(
        self, connector_id: int | None, id_tag: str | None = None
    ) -> Connector | None:
        st = self.st
        if connector_id is not None:
            return st.connectors.get(connector_id)
        free = [c for c in st.connectors.values() if c.can_start]
        if id_tag is not None:
            # A connector reserved for this tag first; none reserved for another.
            mine = [c for c in free if st.guard.held_for(c, id_tag)]
            allowed = [c for c in free if not st.guard.reserved_for_others(c, id_tag)]
            free = mine or allowed or free
        plugged = [c for c in free if c.plugged]
        candidates = plugged or free
        return candidates[0] if candidates else None

    def wait_for_vehicle(
        self, c: Connector, id_tag: str, parent: str | None, profile: dict[str, Any] | None = None
    ) -> None:
        self.clear_waiting(c)
        c.waiting_tag = (id_tag, parent)
        c.waiting_profile = profile
        timeout = self.st.keys.get_int("ConnectionTimeOut")
        if timeout > 0:
            c.waiting_deadline = asyncio.get_running_loop().call_later(
                timeout, self._waiting_expired, c
            )
        self.st.refresh_status(c)

    def _waiting_expired(self, c: Connector) -> None:
        log.info("connector %d: no vehicle within ConnectionTimeOut: authorization dropped", c.id,
                 extra=connector_fields(self.st.store, c))  # fmt: skip
        c.waiting_deadline = None
        c.waiting_tag = None
        self.st.refresh_status(c)

    def clear_waiting(self, c: Connector) -> None:
        if c.waiting_deadline is not None:
            c.waiting_deadline.cancel()
        c.waiting_deadline = None
        c.waiting_tag = None
        c.waiting_profile = None

    # ------------------------------------------------------------------ start and stop
    async def start_transaction(
        self,
        c: Connector,
        id_tag: str,
        parent: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> bool:
        """Start a transaction on ``c`` (vehicle plugged, tag authorized).

        Never fails silently: an error before the transaction exists (the store refusing
        the record, say) is logged in one line and reported to the CSMS
        (:meth:`Station.report_start_failure`), and False returned; the connector is
        left free. An error once the transaction exists propagates (it is recorded and
        StartTransaction queued: the caller's task logs it).
        """
        before = c.tx
        try:
            return await self._start_transaction(c, id_tag, parent, profile)
        except Exception as exc:
            if c.tx is not None and c.tx is not before:
                raise
            c.starting = False
            self.clear_waiting(c)
            log.error("connector %d: the transaction for idTag %s could not start: %s: %s",
                      c.id, id_tag, type(exc).__name__, exc)  # fmt: skip
            self.st.report_start_failure(c, f"transaction start failed: {type(exc).__name__}")
            return False

    async def _start_transaction(
        self, c: Connector, id_tag: str, parent: str | None, profile: dict[str, Any] | None
    ) -> bool:
        st = self.st
        if not c.can_start:
            log.warning("connector %d: cannot start a transaction now", c.id,
                        extra=connector_fields(st.store, c))  # fmt: skip
            return False
        c.starting = True  # no second start while the meter is read
        try:
            reading = await st.metering.read_meter(c) or c.reading
        finally:
            c.starting = False
        if reading is None or not c.can_start:
            log.error("connector %d: no meter reading or not free any more: not starting",
                      c.id, extra=connector_fields(st.store, c))  # fmt: skip
            st.run_idle_callbacks()
            return False
        allowed, reservation_id = st.guard.check_start(c, id_tag, parent)
        if not allowed:
            log.warning("connector %d is reserved for another idTag: not starting", c.id,
                        extra=connector_fields(st.store, c))  # fmt: skip
            st.run_idle_callbacks()
            return False
        now = st.now()
        meter_start = energy_register_wh(reading)
        begin = st.metering.stop_txn_sample(c, reading, "Transaction.Begin", now)
        payload = {
            "connectorId": c.id,
            "idTag": id_tag,
            "meterStart": meter_start,
            "timestamp": iso(now),
        }
        if reservation_id is not None:
            payload["reservationId"] = reservation_id
        local_id = st.store.begin_transaction(
            connector_id=c.id,
            id_tag=id_tag,
            meter_start_wh=meter_start,
            start_ts=iso(now),
            reservation_id=reservation_id,
            start_payload=payload,
        )
        st.guard.consume(reservation_id, local_id)
        # The group, for a stop by another card of it: from the authorization, else what
        # the list or cache knows (a remote start without Authorize, an offline start);
        # StartTransaction.conf may tell it later (on_start_result).
        parent = parent or st.tags.parent_of(id_tag)
        c.tx = ActiveTx(local_id, id_tag, meter_start, now, begin, parent_id_tag=parent)
        c.finishing = False
        self.clear_waiting(c)
        log.info("connector %d: %s started, idTag %s, meterStart %d Wh", c.id,
                 transaction_name(st.store, local_id), id_tag, meter_start,
                 extra=connector_fields(st.store, c))  # fmt: skip
        st.outbox.notify_durable()
        if profile is not None:
            tx = st.tx_for_profiles(c)
            if tx is not None:
                st.limits.install_remote(c.id, profile, tx)
        st.metering.restart_sampler(c)
        await st.actuation.actuate_with_others(c, others_first=True)
        return True

    async def stop_transaction(
        self, c: Connector, reason: str, *, id_tag: str | None = None
    ) -> bool:
        st = self.st
        tx = c.tx
        if tx is None or tx.stopping:
            return False
        tx.stopping = True
        fresh = await st.metering.read_meter(c)
        reading = fresh or c.reading
        now = st.now()
        meter_stop = energy_register_wh(reading) if reading else tx.meter_start_wh
        floor = max(tx.meter_start_wh, tx.highest_wh)
        if meter_stop < floor:
            # A register below what this transaction already read is another meter, a
            # reset or a misread: never less energy than was delivered (and never a
            # negative one) for the CSMS to bill.
            log.warning("connector %d: meter register %d Wh is below %d Wh read earlier in"
                        " the transaction: using that", c.id, meter_stop, floor,
                        extra=connector_fields(st.store, c))  # fmt: skip
            meter_stop = floor
        if fresh is not None:
            end = st.metering.stop_txn_sample(c, fresh, "Transaction.End", now)
        elif st.keys.get_list("StopTxnSampledData"):
            end = st.metering.last_register(c, "Transaction.End")  # the meter does not answer:
        else:  # only its last register, as of when it was read
            end = []
        # Energy off before the transaction closes: the charger never offers current with
        # no transaction open, not even for the length of one command to the controller.
        tx.energy_off = True
        await st.actuate(c)
        rec = TxRecord(
            tx.local_id, c.id, tx.id_tag, None, tx.meter_start_wh, iso(tx.start), None, None
        )
        c.tx = None
        self.stop_record(
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
        st.limits.end_transaction(c.id)  # a TxProfile ends with its transaction
        st.apply_pending_availability(c)
        await st.actuation.actuate_with_others(c, others_first=False)
        st.run_idle_callbacks()
        return True

    def stop_record(
        self,
        rec: TxRecord,
        *,
        meter_stop_wh: int,
        reason: str,
        end_sample: list[dict[str, Any]],
        id_tag: str | None = None,
        now: datetime | None = None,
    ) -> None:
        st = self.st
        ts = iso(now or st.now())
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
        st.store.end_transaction(
            rec.local_id, meter_stop_wh=meter_stop_wh, stop_ts=ts, reason=reason,
            stop_payload=payload,
        )  # fmt: skip
        log.info("connector %d: %s stopped (%s), meterStop %d Wh, %d Wh delivered",
                 rec.connector_id, transaction_name(st.store, rec.local_id), reason,
                 meter_stop_wh, meter_stop_wh - rec.meter_start_wh,
                 extra=transaction_fields(st.store, rec.connector_id, rec.local_id))  # fmt: skip
        st.outbox.notify_durable()

    def recover(self) -> None:
        """Close what the store still holds as running: the agent stopped mid-transaction.

        The reason says why: Reboot after an orderly local stop (SIGTERM: ``systemctl
        restart``, a reboot, a package upgrade); SoftReset/HardReset after a Reset from the
        CSMS (whose transactions are normally stopped before it, with the same reasons; one
        that could not be is closed here); PowerLoss with no such record (a crash, a
        SIGKILL, a power cut).
        """
        st = self.st
        marker = st.store.get("reset.pending")
        st.store.put("reset.pending", None)
        reason = (
            {"Soft": "SoftReset", "Hard": "HardReset"}.get(marker, "Reboot")
            if marker
            else "PowerLoss"
        )
        for rec in st.store.active_transactions():
            c = st.connectors.get(rec.connector_id)
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
                        extra=transaction_fields(st.store, rec.connector_id, rec.local_id),
                    )
            log.warning(
                "%s on connector %d was running at shutdown: stopping it (%s)",
                transaction_name(st.store, rec.local_id),
                rec.connector_id,
                reason,
                extra=transaction_fields(st.store, rec.connector_id, rec.local_id),
            )
            self.stop_record(rec, meter_stop_wh=meter_stop, reason=reason, end_sample=[])

    # ------------------------------------------------------------------ the CSMS's verdict
    def on_start_result(self, local_id: int, result: dict[str, Any]) -> None:
        """StartTransaction.conf: record the CSMS id; act on a refused idTag."""
        st = self.st
        csms_id = int(result["transactionId"])
        st.store.set_csms_transaction_id(local_id, csms_id)
        connector = next(
            (c.id for c in st.connectors.values() if c.tx and c.tx.local_id == local_id), None
        )
        fields = transaction_fields(st.store, connector, local_id)
        log.info("transaction local %d is the CSMS's transaction %d", local_id, csms_id,
                 extra=fields)  # fmt: skip
        info = result.get("idTagInfo")
        status = info.get("status") if isinstance(info, dict) else None
        if status not in ID_TAG_STATUSES:
            # Only from an answer that breaks the schema: no verdict, so nothing changes.
            log.warning("%s: the CSMS sent no usable idTagInfo (%.80r); charging goes on as"
                        " authorized", transaction_name(st.store, local_id), info,
                        extra=fields)  # fmt: skip
        else:
            id_tag = st.store.transaction_id_tag(local_id)
            if id_tag is not None:  # also when it already ended (started and stopped offline)
                st.tags.remember(id_tag, info)
        for c in st.connectors.values():
            if c.tx is None or c.tx.local_id != local_id:
                continue
            if status == "Accepted" or status not in ID_TAG_STATUSES:
                group = info.get("parentIdTag") if isinstance(info, dict) else None
                if isinstance(group, str) and group:
                    c.tx.parent_id_tag = group  # the CSMS's word on the idTag's group
                st.spawn(st.actuate(c), "tx-id-known")  # TxProfiles may name the id
                continue
            log.warning("CSMS refused the idTag of %s (%s)", transaction_name(st.store, local_id),
                        status, extra=fields)  # fmt: skip
            if st.keys.get_bool("StopTransactionOnInvalidId"):
                st.spawn(self.stop_transaction(c, "DeAuthorized"), "deauthorized")
            else:
                self._limit_invalid_energy(c, c.tx)

    def _limit_invalid_energy(self, c: Connector, tx: ActiveTx) -> None:
        """StopTransactionOnInvalidId is false: stop energy (SuspendedEVSE), keeping the
        transaction -- at once, or after MaxEnergyOnInvalidId Wh more (OCPP 1.6 9.1.16)."""
        st = self.st
        allowance = st.keys.get_int("MaxEnergyOnInvalidId")
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
                extra=connector_fields(st.store, c),
            )
            return
        tx.suspended_invalid = True
        st.spawn(st.actuate(c), "suspend-invalid")

    def meter_lost(self, c: Connector) -> None:
        """The meter is Faulted: no energy until it answers again (nothing would bill it;
        the transaction stays, SuspendedEVSE). Energy allowed only up to a metered amount
        (MaxEnergyOnInvalidId) is over for good."""
        st = self.st
        st.refresh_status(c)
        if c.tx is not None:
            log.warning("connector %d: meter lost while charging: energy paused", c.id,
                        extra=connector_fields(st.store, c))  # fmt: skip
            st.spawn(st.actuate(c), "meter-lost")
        tx = c.tx
        if tx is not None and tx.invalid_energy_limit_wh is not None and not tx.suspended_invalid:
            log.warning(
                "connector %d: meter lost while charging on an invalid idTag: suspending energy",
                c.id,
                extra=connector_fields(st.store, c),
            )
            tx.suspended_invalid = True
            st.spawn(st.actuate(c), "suspend-invalid")

    def check_invalid_energy(self, c: Connector, reading: MeterReading) -> None:
        tx = c.tx
        if tx is None or tx.invalid_energy_limit_wh is None or tx.suspended_invalid:
            return
        if energy_register_wh(reading) >= tx.invalid_energy_limit_wh:
            log.warning("connector %d: MaxEnergyOnInvalidId delivered: suspending energy", c.id,
                        extra=connector_fields(self.st.store, c))  # fmt: skip
            tx.suspended_invalid = True
            self.st.spawn(self.st.actuate(c), "suspend-invalid")
