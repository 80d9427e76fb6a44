"""The single sender: what goes out on the CSMS connection, in which order, and the
retry policy of the durable transaction-message queue.

One :class:`Sender` lives as long as the agent (its timers and the registration survive a
reconnect); :meth:`Sender.run` runs per connection beside the adapter's receive loop and
is the only caller of ``OcppAdapter.send`` (OCPP-J allows one CALL in flight). Order: the
BootNotification until it is Accepted; then volatile messages (statuses, triggered
messages, Authorize), the queue's head when its retry time has come, heartbeats.
A transaction message that gets no answer is sent again, never given up; one the CSMS
refuses (a CALLERROR) is retried per TransactionMessageAttempts / RetryInterval and then
kept, marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ocpp.exceptions import OCPPError
from websockets.exceptions import ConnectionClosed

from agent.chargepoint.station import Station
from agent.core.timefmt import iso, parse_time
from agent.ocpp.adapter import MalformedResult, OcppAdapter, UnsendableMessage
from agent.outbox import Outgoing
from agent.store import QueuedMessage, message_time

log = logging.getLogger("evcp.session")

#: CALLERROR codes that say the CSMS does not know or support the action at all.
UNKNOWN_TO_CSMS = ("NotImplemented", "NotSupported")
#: The longest wait before a transaction message that got no answer is sent again.
UNANSWERED_MAX_WAIT_S = 600
#: The longest interval a CSMS can set in BootNotification.conf (HeartbeatInterval's
#: maximum); larger values are clamped to it.
MAX_INTERVAL_S = 86400


class Remember(Protocol):
    def remember(self, id_tag: str, info: Any) -> None: ...


class Sender:
    """Args:
    station: the charge point (its outbox, store and transactions).
    boot_payload: the BootNotification's payload (the Core feature).
    tags: the authorization cache, told every idTagInfo a StopTransaction.conf brings.
    closing: set while the connection is about to close (nothing new is sent).
    """

    def __init__(
        self,
        *,
        station: Station,
        boot_payload: Callable[[], dict[str, Any]],
        tags: Remember,
        closing: asyncio.Event,
        boot_accepted: Callable[[], None] = lambda: None,
    ) -> None:
        self.station = station
        self.keys = station.keys
        self.boot_payload = boot_payload
        self.tags = tags
        self.closing = closing
        self.boot_accepted = boot_accepted
        self.registration: str | None = None  # last BootNotification status
        self.boot_due = 0.0
        self._heartbeat_due = 0.0
        self.retry_at = 0.0
        self._unanswered = 0  # queued messages in a row that got no answer
        #: The queued message whose answer is awaited (left set if the connection drops).
        self.in_flight: QueuedMessage | None = None
        self.force_boot = False
        #: The queue's head goes next when both it and a volatile message wait.
        self._queue_turn = False
        #: When the CSMS last answered a Heartbeat (ISO 8601), for ``evcp status``.
        self.last_heartbeat: str | None = None

    def _next_volatile(self, *, queue_empty: bool) -> Outgoing | None:
        """The first volatile message that may go now (one that must wait for the queue
        to empty is passed over, not the ones behind it)."""
        for message in self.station.outbox.volatile:
            if queue_empty or not message.after_queue:
                return message
        return None

    def boot_now(self) -> None:
        self.boot_due = 0.0
        self.force_boot = True
        self.station.outbox.wake.set()

    def send_queue_now(self) -> None:
        self.retry_at = 0.0
        self.station.outbox.wake.set()

    def connected(self) -> None:
        """A new connection: nothing in flight yet, the queue's head goes at once."""
        self.in_flight = None
        self.retry_at = 0.0

    async def run(self, cp: OcppAdapter) -> None:
        """Send until cancelled: the BootNotification first, then volatile messages,
        the durable queue's head and heartbeats; the only caller of ``cp.send``."""
        loop = asyncio.get_running_loop()
        station = self.station
        outbox = station.outbox
        while True:
            if self.closing.is_set():
                await loop.create_future()  # nothing new on a connection about to close
            now = loop.time()
            if self.registration != "Accepted" or self.force_boot:
                if now >= self.boot_due:
                    await self._boot(cp)
                    continue
                if self.registration == "Pending" and outbox.volatile:
                    await self._send_volatile(cp, outbox.volatile.popleft())
                    continue
                if self.registration == "Rejected":
                    outbox.drop_volatile("the CSMS rejected this charger")  # send nothing
                await self._sleep_until(self.boot_due)
                continue
            head = station.store.queue_head()
            queue_due = head is not None and now >= self.retry_at
            message = self._next_volatile(queue_empty=head is None)
            # Fair turns: with both waiting, a volatile message and the queue's head
            # alternate, so neither a flood of statuses or triggered messages nor a long
            # backlog of transaction messages holds the other back.
            if message is not None and not (queue_due and self._queue_turn):
                outbox.volatile.remove(message)
                self._queue_turn = True
                await self._send_volatile(cp, message)
                continue
            if queue_due:
                self._queue_turn = False
                await self._send_queued(cp)
                continue
            interval = self.keys.get_int("HeartbeatInterval")
            if interval > 0 and now >= self._heartbeat_due:
                # Due again one interval later even if this one is refused (no busy loop).
                self._heartbeat_due = now + interval
                await self._send_volatile(cp, Outgoing("Heartbeat", {}))
                continue
            wake_at = self._heartbeat_due if interval > 0 else now + 3600
            if head is not None:
                wake_at = min(wake_at, self.retry_at)
            await self._sleep_until(wake_at)

    async def _sleep_until(self, when: float) -> None:
        outbox = self.station.outbox
        outbox.wake.clear()
        delay = when - asyncio.get_running_loop().time()
        if delay <= 0:
            return
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(delay):
                await outbox.wake.wait()
        except TimeoutError:
            pass

    async def _boot(self, cp: OcppAdapter) -> None:
        loop = asyncio.get_running_loop()
        self.force_boot = False
        try:
            result = await cp.send("BootNotification", self.boot_payload())
        except MalformedResult as exc:
            result = exc.payload
            if not _usable_boot_answer(result):
                log.warning("BootNotification failed: %s; retrying in 60 s", exc)
                self.boot_due = loop.time() + 60
                return
            log.warning("BootNotification answered, but %s; using its status and interval", exc)
        except (OCPPError, TimeoutError) as exc:
            log.warning("BootNotification failed: %s; retrying in 60 s", exc)
            self.boot_due = loop.time() + 60
            return
        status = result["status"]
        interval = min(int(result["interval"]), MAX_INTERVAL_S)
        self._check_clock(result.get("currentTime"))
        self.registration = status
        if status == "Accepted":
            self.station.registered = True
            if interval > 0:
                self.keys.set("HeartbeatInterval", str(interval))
            self._heartbeat_due = loop.time() + self.keys.get_int("HeartbeatInterval")
            log.info("BootNotification accepted; heartbeat every %d s", interval)
            self.station.send_all_statuses()
            self.boot_accepted()
            return
        retry = interval if interval > 0 else 60
        log.warning("BootNotification %s by the CSMS; retrying in %d s", status, retry)
        self.boot_due = loop.time() + retry

    def heartbeat_interval_changed(self) -> None:
        """A new HeartbeatInterval takes effect at once: the next heartbeat is due one new
        interval after the last one at the latest."""
        interval = self.keys.get_int("HeartbeatInterval")
        if interval > 0:
            now = asyncio.get_running_loop().time()
            self._heartbeat_due = min(self._heartbeat_due, now + interval)
        self.station.outbox.wake.set()

    def _check_clock(self, current_time: Any) -> None:
        if not current_time or not isinstance(current_time, str):
            return
        try:
            csms_now = parse_time(current_time)
        except ValueError:
            log.warning("CSMS sent an unreadable currentTime %r", current_time)
            return
        skew = (csms_now - self.station.now()).total_seconds()
        if abs(skew) > 5:
            log.warning("the CSMS clock differs from ours by %.1f s", skew)

    async def _send_volatile(self, cp: OcppAdapter, message: Outgoing) -> None:
        try:
            result = await cp.send(message.action, message.payload)
        except (OCPPError, TimeoutError) as exc:
            log.warning("%s not accepted by the CSMS: %s", message.action, exc)
            if message.future is not None and not message.future.done():
                message.future.set_exception(exc)
            return
        except (UnsendableMessage, TypeError, ValueError) as exc:
            # A bug of ours, not the CSMS's: one error line, and the agent carries on.
            log.error("%s cannot be sent: %s: %s", message.action, type(exc).__name__, exc)
            if message.future is not None and not message.future.done():
                message.future.set_exception(exc)
            return
        except BaseException as exc:
            if message.future is not None and not message.future.done():
                message.future.set_exception(ConnectionError("connection lost"))
            raise exc
        if message.action == "Heartbeat":
            self._heartbeat_due = asyncio.get_running_loop().time() + self.keys.get_int(
                "HeartbeatInterval"
            )
            self._check_clock(result.get("currentTime"))
            self.last_heartbeat = iso(self.station.now())
        if message.on_result is not None:
            message.on_result(result)
        if message.future is not None and not message.future.done():
            message.future.set_result(result)

    async def _send_queued(self, cp: OcppAdapter) -> None:
        store = self.station.store
        head = store.queue_head()
        if head is None:
            return
        payload = dict(head.payload)
        if head.action != "StartTransaction" and head.tx_local_id is not None:
            csms_id = store.csms_transaction_id(head.tx_local_id)
            if csms_id is None:
                log.error(
                    "%s of local transaction %d cannot be delivered: its StartTransaction was"
                    " given up; kept in the queue as failed (evcp queue retry sends them again)",
                    head.action,
                    head.tx_local_id,
                )
                store.queue_attempt(head.seq, "its StartTransaction failed", give_up=True)
                return
            payload["transactionId"] = csms_id
        try:
            result = await self._send_tracked(cp, head, payload)
        except MalformedResult as exc:
            # A CALLRESULT came back, so the CSMS has the message: sending it again would
            # only make a duplicate. Go on with what can be read from the answer.
            log.warning("%s (queue #%d) delivered, but %s", head.action, head.seq, exc)
            result = exc.payload
        except OCPPError as exc:
            if head.tx_local_id is None and exc.code in UNKNOWN_TO_CSMS:
                # A security event to a CSMS without the security extensions: retrying
                # cannot help, and it must not hold the transaction messages behind it.
                # (The charger's security log keeps it.)
                log.warning("%s (queue #%d): the CSMS does not support it (%s); dropped",
                            head.action, head.seq, exc.code)  # fmt: skip
                store.queue_done(head.seq)
                return
            self.queued_failed(head, exc)
            return
        except TimeoutError as exc:
            self._queued_unanswered(head, exc)
            return
        except (ConnectionClosed, asyncio.CancelledError):
            # The connection dropped between the CALL and its result: the message stays
            # first in the queue and is sent again, unchanged, after the reconnect (see
            # _serve for a CSMS that closes the connection over it: 1009).
            raise
        except (UnsendableMessage, TypeError, ValueError) as exc:
            # A message that cannot even be sent (it breaks the schema): retrying cannot
            # help, and it must not stop the queue behind it.
            log.error("%s (queue #%d) cannot be sent: %s; kept as failed", head.action,
                      head.seq, exc)  # fmt: skip
            store.queue_attempt(head.seq, f"{type(exc).__name__}: {exc}", give_up=True)
            return
        self._unanswered = 0
        if head.action == "StartTransaction" and head.tx_local_id is not None:
            csms_id = _transaction_id(result.get("transactionId"))
            if csms_id is None:
                # Later messages of the transaction need the id: this answer is no use,
                # as good as a failure to process it (so: retried, then kept as failed).
                self.queued_failed(head, MalformedResult(head.action, result,
                    f"no usable transactionId ({result.get('transactionId')!r:.40})"))  # fmt: skip
                return
            store.start_delivered(head.seq, head.tx_local_id, csms_id)
            self.station.on_start_result(head.tx_local_id, result)
        else:
            store.queue_done(head.seq)
            if head.action == "StopTransaction" and "idTag" in payload:
                self.tags.remember(str(payload["idTag"]), result.get("idTagInfo"))

    async def _send_tracked(
        self, cp: OcppAdapter, head: QueuedMessage, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """``cp.send`` for a queued message, remembered as in flight until it has an
        outcome; a connection that drops meanwhile leaves it set for _serve to judge."""
        self.in_flight = head
        try:
            result = await cp.send(head.action, payload, validate=head.action != "MeterValues")
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except BaseException:
            self.in_flight = None
            raise
        self.in_flight = None
        return result

    def _queued_unanswered(self, head: QueuedMessage, exc: TimeoutError) -> None:
        """No answer within the response timeout. Not a refusal: OCPP 1.6 lets a charger
        skip a transaction message only when the CSMS keeps failing to process it (a
        CALLERROR), and the CSMS may well have this one. Never given up: sent again after
        TransactionMessageRetryInterval times the unanswered tries so far (at most 10 min),
        while volatile messages (statuses, heartbeats) keep flowing in between."""
        self._unanswered += 1
        retry = self.keys.get_int("TransactionMessageRetryInterval")
        wait = min(retry * self._unanswered, max(retry, UNANSWERED_MAX_WAIT_S))
        log.warning(
            "%s (queue #%d) not answered (%s); sending it again in %d s",
            head.action,
            head.seq,
            exc,
            wait,
        )
        self.retry_at = asyncio.get_running_loop().time() + wait

    def queued_failed(self, head: QueuedMessage, exc: Exception) -> None:
        """A CALLERROR (or an answer without a usable transactionId): retry after
        TransactionMessageRetryInterval times the attempts so far, up to
        TransactionMessageAttempts; then keep it, marked failed (it stays in the store, in
        ``evcp status`` and ``evcp queue``, from where ``evcp queue retry`` sends it again;
        the queue moves on)."""
        attempts = head.attempts + 1
        give_up = attempts >= self.keys.get_int("TransactionMessageAttempts")
        self.station.store.queue_attempt(head.seq, str(exc) or type(exc).__name__, give_up=give_up)
        if give_up:
            log.error(
                "%s (queue #%d, taken at %s) refused %d times, last: %s; kept as failed",
                head.action,
                head.seq,
                message_time(head.action, head.payload),
                attempts,
                exc,
            )
            return
        wait = self.keys.get_int("TransactionMessageRetryInterval") * attempts
        log.warning(
            "%s (queue #%d) failed (%s); retry %d in %d s",
            head.action,
            head.seq,
            exc,
            attempts + 1,
            wait,
        )
        self.retry_at = asyncio.get_running_loop().time() + wait


def _usable_boot_answer(result: dict[str, Any]) -> bool:
    """A BootNotification.conf that broke the schema but still says what matters."""
    interval = result.get("interval")
    return (
        result.get("status") in ("Accepted", "Pending", "Rejected")
        and isinstance(interval, int)
        and not isinstance(interval, bool)
        and interval >= 0
    )


def _transaction_id(value: Any) -> int | None:
    """The transactionId of a StartTransaction.conf, if it can be used: an integer that
    fits the store (64-bit), also when a CSMS sent it as a string ("1001") or as 1001.0."""
    if isinstance(value, str) and len(value) <= 20:
        with contextlib.suppress(ValueError):
            value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not -(2**63) <= value < 2**63:
        return None
    return value
