"""The life of the CSMS connection: connect, boot, send, heartbeat, reconnect.

:class:`Session` runs forever. Each connection runs two tasks side by side: the
adapter's receive loop and :meth:`Session._sender`, the only caller of ``call()``. When the
socket closes, the sender is cancelled at once (a pending CALL does not wait for
its timeout), volatile messages are dropped, and the loop reconnects after a back-off
delay. Every connect failure (401, TLS, network) is logged in one clear line and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ocpp.exceptions import OCPPError
from websockets.exceptions import ConnectionClosed

from agent.aio import raise_if_cancelling
from agent.config import Config
from agent.core.smart_charging import parse_time
from agent.ocpp.adapter import MalformedResult, OcppAdapter, UnsendableMessage
from agent.ocpp.transport import backoff, classify, open_connection, tls_context
from agent.outbox import Outgoing
from agent.station import Station
from agent.store import QueuedMessage, message_time

log = logging.getLogger("evcp.session")

TRANSACTION_ACTIONS = ("StartTransaction", "StopTransaction", "MeterValues")
#: The longest wait before a transaction message that got no answer is sent again.
UNANSWERED_MAX_WAIT_S = 600
#: A connection that stayed up this long resets the reconnect back-off; one that the CSMS
#: (or a load balancer) closes sooner does not, so the delays keep growing.
STABLE_CONNECTION_S = 30.0
#: The longest interval a CSMS can set in BootNotification.conf (HeartbeatInterval's
#: maximum); larger values are clamped to it.
MAX_INTERVAL_S = 86400


class _Reconnect(Exception):
    """Raised inside a connection's tasks to close it and connect again."""


class Session:
    def __init__(self, *, cfg: Config, station: Station, password: str) -> None:
        self.cfg = cfg
        self.station = station
        self.keys = station.keys
        self.password = password
        self.registration: str | None = None  # last BootNotification status
        self._boot_due = 0.0
        self._heartbeat_due = 0.0
        self._retry_at = 0.0
        self._unanswered = 0  # queued messages in a row that got no answer
        #: The queued message whose answer is awaited (left set if the connection drops).
        self._in_flight: QueuedMessage | None = None
        self._reconnect = asyncio.Event()
        self._reconnect_reason = ""
        self._force_boot = False
        self._ssl = tls_context(cfg.csms["ca_file"] or None)
        station.request_boot = self._boot_now
        station.send_queue_now = self._send_queue_now

    # ------------------------------------------------------------------ control
    def wake(self) -> None:
        self.station.outbox.wake.set()

    def _boot_now(self) -> None:
        self._boot_due = 0.0
        self._force_boot = True
        self.wake()

    def _send_queue_now(self) -> None:
        self._retry_at = 0.0
        self.wake()

    def request_reconnect(self, reason: str) -> None:
        self._reconnect_reason = reason
        self._reconnect.set()

    def key_changed(self, value: str) -> bool:
        """A new AuthorizationKey was accepted: persist it and reconnect with it."""
        if value == self.password:
            return False
        self.password = value
        self.station.store.put("csms.password", value)
        from agent.logs import add_secret

        add_secret(value)
        self.request_reconnect("new AuthorizationKey")
        return True

    # ------------------------------------------------------------------ connection loop
    async def run(self) -> None:
        csms = self.cfg.csms
        delays = backoff(initial_s=csms["reconnect_min_s"], maximum_s=csms["reconnect_max_s"])
        while True:
            try:
                ws = await open_connection(
                    url=csms["url"],
                    charge_point_id=csms["charge_point_id"],
                    password=self.password,
                    ssl_context=self._ssl,
                    ping_interval_s=self.keys.get_int("WebSocketPingInterval"),
                    proxy=csms["proxy"],
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling()  # a cancellation turned into an error by a library
                failure = classify(exc)
                delay = next(delays)
                self.station.last_connect_error = f"{failure.kind}: {failure.detail}"
                log.warning(
                    "cannot connect to the CSMS (%s: %s); retrying in %.1f s",
                    failure.kind,
                    failure.detail,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            log.info("connected to %s as %s", csms["url"], csms["charge_point_id"])
            self.station.last_connect_error = None
            loop = asyncio.get_running_loop()
            opened = loop.time()
            await self._serve(ws)
            if loop.time() - opened >= STABLE_CONNECTION_S:
                delays = backoff(
                    initial_s=csms["reconnect_min_s"], maximum_s=csms["reconnect_max_s"]
                )
            delay = next(delays)
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _serve(self, ws: Any) -> None:
        station = self.station
        adapter = OcppAdapter(
            self.cfg.csms["charge_point_id"],
            ws,
            station,
            self,
            response_timeout=float(self.cfg.csms["response_timeout_s"]),
        )
        self._reconnect.clear()
        self._in_flight = None
        station.connected = True
        station.outbox.online = True
        self._retry_at = 0.0
        if self.registration == "Accepted":
            station.send_all_statuses()
        # Not a TaskGroup: on Python 3.11, when the agent is stopped (this task cancelled)
        # just as the socket closes, a TaskGroup raises the children's ConnectionClosed
        # instead of CancelledError, the cancellation is lost and the agent never stops;
        # and a child failing while the group waits leaves this task marked "cancelling".
        tasks = [
            asyncio.create_task(adapter.start(), name="receive"),
            asyncio.create_task(self._sender(adapter), name="sender"),
            asyncio.create_task(self._watch_reconnect(adapter), name="reconnect"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            station.connected = False
            station.outbox.go_offline()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await ws.close()
        # Retrieve every outcome (no "exception never retrieved"); act on the first one.
        outcomes = [None if task.cancelled() else task.exception() for task in tasks]
        first = next(i for i, task in enumerate(tasks) if task in done)
        exc = outcomes[first]
        if isinstance(exc, ConnectionClosed):
            log.warning("connection to the CSMS closed: %s", exc)
            if exc.rcvd is not None and exc.rcvd.code == 1009 and self._in_flight is not None:
                # "Message too big" while a queued message waited for its answer: the CSMS
                # refuses that message. Counted as a failed try, or the queue would send it
                # after every reconnect forever.
                self._queued_failed(self._in_flight, exc)
        elif isinstance(exc, _Reconnect):
            log.info("reconnecting: %s", self._reconnect_reason)
        elif exc is not None:
            # A bug, or input nothing above foresaw: this connection ends, the agent (and
            # the charging) carries on, and the back-off keeps a repeat from looping fast.
            log.error("%s task failed: %s: %s; reconnecting", tasks[first].get_name(),
                      type(exc).__name__, exc, exc_info=exc)  # fmt: skip
        else:
            log.warning("connection to the CSMS ended (%s stopped)", tasks[first].get_name())

    async def _watch_reconnect(self, cp: OcppAdapter) -> None:
        """Close the connection when the agent wants a new one (a new AuthorizationKey or
        WebSocketPingInterval) -- but first let a CALL in flight get its answer (for at most
        the response timeout): cutting off a StartTransaction would send it twice."""
        await self._reconnect.wait()
        if not cp.idle.is_set() or cp.answering:
            log.info("reconnecting once the messages in flight are answered")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(self.cfg.csms["response_timeout_s"])):
                    while not cp.idle.is_set() or cp.answering:
                        await asyncio.sleep(0.05)
        raise _Reconnect

    # ------------------------------------------------------------------ sender
    async def _sender(self, cp: OcppAdapter) -> None:
        loop = asyncio.get_running_loop()
        station = self.station
        outbox = station.outbox
        while True:
            if self._reconnect.is_set():
                await loop.create_future()  # nothing new on a connection about to close
            now = loop.time()
            if self.registration != "Accepted" or self._force_boot:
                if now >= self._boot_due:
                    await self._boot(cp)
                    continue
                if self.registration == "Pending" and outbox.volatile:
                    await self._send_volatile(cp, outbox.volatile.popleft())
                    continue
                if self.registration == "Rejected":
                    outbox.drop_volatile("the CSMS rejected this charger")  # send nothing
                await self._sleep_until(self._boot_due)
                continue
            if outbox.volatile:
                await self._send_volatile(cp, outbox.volatile.popleft())
                continue
            head = station.store.queue_head()
            if head is not None and now >= self._retry_at:
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
                wake_at = min(wake_at, self._retry_at)
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
        self._force_boot = False
        try:
            result = await cp.send("BootNotification", self.station.boot_payload())
        except MalformedResult as exc:
            result = exc.payload
            if not _usable_boot_answer(result):
                log.warning("BootNotification failed: %s; retrying in 60 s", exc)
                self._boot_due = loop.time() + 60
                return
            log.warning("BootNotification answered, but %s; using its status and interval", exc)
        except (OCPPError, TimeoutError) as exc:
            log.warning("BootNotification failed: %s; retrying in 60 s", exc)
            self._boot_due = loop.time() + 60
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
            return
        retry = interval if interval > 0 else 60
        log.warning("BootNotification %s by the CSMS; retrying in %d s", status, retry)
        self._boot_due = loop.time() + retry

    def heartbeat_interval_changed(self) -> None:
        """A new HeartbeatInterval takes effect at once: the next heartbeat is due one new
        interval after the last one at the latest."""
        interval = self.keys.get_int("HeartbeatInterval")
        if interval > 0:
            now = asyncio.get_running_loop().time()
            self._heartbeat_due = min(self._heartbeat_due, now + interval)
        self.wake()

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
            self._queued_failed(head, exc)
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
                self._queued_failed(head, MalformedResult(head.action, result,
                    f"no usable transactionId ({result.get('transactionId')!r:.40})"))  # fmt: skip
                return
            store.start_delivered(head.seq, head.tx_local_id, csms_id)
            self.station.on_start_result(head.tx_local_id, result)
        else:
            store.queue_done(head.seq)
            if head.action == "StopTransaction" and "idTag" in payload:
                self.station.auth.remember(str(payload["idTag"]), result.get("idTagInfo"))

    async def _send_tracked(
        self, cp: OcppAdapter, head: QueuedMessage, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """``cp.send`` for a queued message, remembered as in flight until it has an
        outcome; a connection that drops meanwhile leaves it set for _serve to judge."""
        self._in_flight = head
        try:
            result = await cp.send(head.action, payload, validate=head.action != "MeterValues")
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except BaseException:
            self._in_flight = None
            raise
        self._in_flight = None
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
        self._retry_at = asyncio.get_running_loop().time() + wait

    def _queued_failed(self, head: QueuedMessage, exc: Exception) -> None:
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
        self._retry_at = asyncio.get_running_loop().time() + wait


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
