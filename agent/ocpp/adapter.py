"""The one place that speaks the ``ocpp`` library: handlers for CSMS requests, and ``send``.

The handlers, one mixin per feature profile, are in :mod:`agent.ocpp.handlers`: they
translate the library's snake_case kwargs into calls of the features' services and return
the library's result dataclasses. They never await a CALL (that would deadlock the receive
loop, ocpp pitfall 1).

In place of the library's ``route_message`` sits :meth:`OcppAdapter.route_frame`: every
frame first goes through :func:`agent.ocpp.precheck.precheck`, which answers what the
library would drop, answer wrongly or fail on (a malformed CALL, an unknown action:
NotImplemented, a known one without a handler: NotSupported, numbers and strings no OCPP
field can hold, a frame over the size limit, a SendLocalList over SendLocalListMaxLength)
with the OCPP-J 1.6 Table 7 code, and drops what cannot be answered; results for unknown
message ids are dropped with one log line. Nothing a CSMS sends can end the receive loop:
an unexpected error while handling a frame is logged in one line (a CALL not yet answered
gets an InternalError CALLERROR).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ocpp.charge_point import remove_nones
from ocpp.exceptions import (
    FormationViolationError,
    FormatViolationError,
    GenericError,
    OCPPError,
    UnknownCallErrorCodeError,
    ValidationError,
)
from ocpp.messages import (
    Call,
    CallError,
    CallResult,
    MessageType,
    _validate_payload,
    validate_payload,
)
from ocpp.v16 import ChargePoint
from websockets.exceptions import ConnectionClosed

from agent import logs
from agent.aio import raise_if_cancelling
from agent.assembly import Features
from agent.core.config_keys import ConfigKeys
from agent.core.security import EventType
from agent.features.registry import is_secret
from agent.ocpp.handlers import ConnectionControl
from agent.ocpp.handlers.core import CoreHandlers
from agent.ocpp.handlers.firmware import FirmwareHandlers
from agent.ocpp.handlers.local_auth_list import LocalAuthListHandlers
from agent.ocpp.handlers.remote_trigger import RemoteTriggerHandlers
from agent.ocpp.handlers.reservation import ReservationHandlers
from agent.ocpp.handlers.security import SecurityHandlers
from agent.ocpp.handlers.smart_charging import SmartChargingHandlers
from agent.ocpp.precheck import Answer, Drop, precheck

log = logging.getLogger("evcp.ocpp")


class _OneLine(logging.Filter):
    """The library logs every bad frame with a traceback: keep one line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        message = record.getMessage()
        record.msg = message[:300] + ("..." if len(message) > 300 else "")
        record.args = None
        return True


class UnsendableMessage(ValueError):
    """The message breaks the OCPP 1.6 schema: it was not sent, and never can be."""


class MalformedResult(FormatViolationError):
    """The CSMS answered the CALL with a CALLRESULT whose payload breaks the schema.

    The CSMS did receive the message (a refusal is a CALLERROR); ``payload`` is what came
    back, for the fields that can still be used. Deliberately not a direct subclass of
    OCPPError: the library maps CALLERROR codes over those, and this is not one.
    """

    def __init__(self, action: str, payload: dict[str, Any], cause: str) -> None:
        super().__init__(
            description=f"the CSMS answered {action} with a malformed payload: {cause}"
        )
        self.payload = payload

    def __str__(self) -> str:
        return str(self.description)


def _cause(exc: Exception) -> str:
    """One line saying why the library's schema check failed."""
    details = getattr(exc, "details", None)
    if isinstance(details, dict) and details.get("cause"):
        return str(details["cause"])[:200]
    return (getattr(exc, "description", None) or str(exc) or type(exc).__name__)[:200]


#: The library's own logger: warnings and errors only, one line each (frames are logged
#: by evcp at debug level, with secrets redacted by agent.logs).
LIB_LOG = logging.getLogger("evcp.ocpp.lib")
LIB_LOG.setLevel(logging.WARNING)
LIB_LOG.addFilter(_OneLine())

#: Lengths of a ChangeConfiguration(AuthorizationKey) value kept out of the log while it
#: is handled, even when the change is refused (a near-miss of a real 16-40 character
#: key): one a key cannot come close to is no secret, and a short one (a refused "Charging")
#: would blank an ordinary word in every line until the next candidate.
SECRET_LENGTHS = (12, 40)

#: Work in one step of a SendLocalList's schema check (seconds): the event loop runs
#: between steps. The first step checks FIRST_CHECK_ENTRIES entries (a list no longer is
#: checked in one go); the next as many as fit in the time.
CHECK_STEP_S = 0.002
FIRST_CHECK_ENTRIES = 100


class OcppAdapter(
    CoreHandlers,
    SmartChargingHandlers,
    LocalAuthListHandlers,
    ReservationHandlers,
    RemoteTriggerHandlers,
    FirmwareHandlers,
    SecurityHandlers,
    ChargePoint,
):
    """``ocpp.v16.ChargePoint`` bound to the feature profiles. One instance per connection.

    Args:
        features: the feature profiles' services, which the handler mixins
            (``agent.ocpp.handlers``) ask.
        keys: the OCPP configuration keys.
        control: the connection's control (the session): reconnect, new key, heartbeat.
    """

    def __init__(self, charge_point_id: str, connection: Any, *, features: Features,
                 keys: ConfigKeys, control: ConnectionControl,
                 response_timeout: float) -> None:  # fmt: skip
        super().__init__(
            charge_point_id, connection, response_timeout=response_timeout, logger=LIB_LOG
        )
        self.features = features
        self.keys = keys
        self.control = control
        self.pending_ids: set[str] = set()
        #: Clear while a CALL of ours waits for its answer.
        self.idle = asyncio.Event()
        self.idle.set()
        #: Id of the CALL being handled and whether it has been answered yet.
        self._handling: str | None = None
        self._answered = False
        self._changed_key: str | None = None
        self._invalid_reported = False
        #: The actions with a handler here: another OCPP 1.6 action is NotSupported.
        self._handled = frozenset(
            action for action, handler in self.route_map.items() if "_on_action" in handler
        )

    @property
    def answering(self) -> bool:
        """A CALL from the CSMS is being handled and not answered yet."""
        return self._handling is not None and not self._answered

    # ------------------------------------------------------------------ frames
    async def start(self) -> None:
        while True:
            raw = await self._connection.recv()
            await self.route_frame(raw)

    async def route_frame(self, raw: str | bytes) -> None:
        """Pre-check a frame (:mod:`agent.ocpp.precheck`), then hand it to the library."""
        decision = precheck(
            raw,
            handled=self._handled,
            send_local_list_max_length=self.keys.get_int("SendLocalListMaxLength"),
        )
        if isinstance(decision, Drop):
            log.warning("%s", decision.reason)  # no CSMS text in it; RepeatFilter limits it
            return
        if isinstance(decision, Answer):
            log.warning("answering message %s with %s", decision.unique_id,
                        decision.code or "a CALLRESULT")  # fmt: skip
            if decision.code == "FormationViolation":
                self._report_invalid(str(decision.details.get("cause", decision.description)))
            await self._send(decision.to_json())
            return
        frame = decision.frame
        kind, unique_id = frame[0], frame[1]
        if kind == 2:
            payload = frame[3]
            if frame[2] == "ChangeConfiguration" and is_secret(str(payload.get("key"))):
                value = payload.get("value")
                if isinstance(value, str) and SECRET_LENGTHS[0] <= len(value) <= SECRET_LENGTHS[1]:
                    logs.candidate_secret(value)  # accepted or refused, never in a log line
        elif unique_id not in self.pending_ids:
            log.warning("dropped a %s for unknown message id %s",
                        "CALLRESULT" if kind == 3 else "CALLERROR", unique_id)  # fmt: skip
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("< %s", raw)
        self._handling, self._answered = (unique_id if kind == 2 else None), False
        try:
            await self._route(frame)
        except ConnectionClosed:
            raise
        except Exception as exc:
            # The library lets some errors escape (e.g. from an @after handler); one bad
            # frame must not end the connection, let alone the agent.
            log.error("error while handling message %s: %s", unique_id, type(exc).__name__)
            if kind == 2 and not self._answered:
                await self._call_error(unique_id, "InternalError", "the request failed")
        finally:
            self._handling = None

    async def _route(self, frame: list[Any]) -> None:
        """What the library's ``route_message`` does with a frame, for the frame as
        :func:`precheck` parsed it (the library would parse the text again: a few
        milliseconds of the event loop for a SendLocalList of 10,000 entries). Its shape is
        checked: a CALL has 4 items, a CALLRESULT 3, a CALLERROR 4 or 5."""
        if frame[0] == 2:
            msg = Call(*frame[1:])
            try:
                await self._handle_call(msg)
            except OCPPError as error:
                self.logger.exception("Error while handling request '%s'", msg)
                await self._send(msg.create_call_error(error).to_json())
            return
        response = CallResult(*frame[1:]) if frame[0] == 3 else CallError(*frame[1:])
        self._response_queue.put_nowait(response)

    async def _handle_call(self, msg: Any) -> Any:
        # The library reports a payload that breaks the schema as "FormatViolation", the
        # OCPP 2.0.1 name; OCPP 1.6 (section 4.2.3) calls it "FormationViolation".
        try:
            if msg.action == "SendLocalList":
                await self._send_local_list(msg)
                return None
            return await super()._handle_call(msg)
        except FormatViolationError as exc:
            raise FormationViolationError(
                description=exc.description, details=exc.details
            ) from None

    async def _send_local_list(self, msg: Any) -> None:
        """SendLocalList without the library's case conversion: the schema is checked as
        for every CALL (the library's check; in steps, :meth:`_validate_local_list`), then
        the camelCase entries go to the service as they are, which applies them in steps
        too. The library would convert a list of SendLocalListMaxLength entries to
        snake_case for the handler, which converted it back: two deep copies of the list,
        in the event loop."""
        await self._validate_local_list(msg)
        payload = msg.payload
        status = await self.features.local_auth_list.send_local_list_in_steps(
            payload["listVersion"],
            str(payload["updateType"]),
            payload.get("localAuthorizationList") or [],
        )
        await self._send(msg.create_call_result({"status": status}).to_json())

    async def _validate_local_list(self, msg: Any) -> None:
        """The library's schema check of a SendLocalList (its own check, with its errors),
        in the event loop, a few milliseconds' worth of entries at a time. Not in a worker
        thread as for other CALLs: a list of 10,000 entries takes a quarter of a second to
        check, and a thread holding the interpreter that long made every database write of
        the agent meanwhile wait for it at each of its steps (tens of milliseconds each).

        The parts are checked in the order the library meets them in the whole payload,
        so that the first error found is the one the whole payload gets: ``listVersion``,
        then the entries (each part beside a valid head), then ``updateType``, fields the
        schema does not know and missing ones (the real head with an empty list)."""
        payload = msg.payload
        entries = payload.get("localAuthorizationList")
        if not isinstance(entries, list) or len(entries) <= FIRST_CHECK_ENTRIES:
            _validate_payload(msg, self._ocpp_version)
            return

        def check(body: dict[str, Any]) -> None:
            _validate_payload(Call(msg.unique_id, msg.action, body), self._ocpp_version)

        if "listVersion" in payload:
            check({"listVersion": payload["listVersion"], "updateType": "Full"})
        count, first = FIRST_CHECK_ENTRIES, 0
        while first < len(entries):
            await asyncio.sleep(0)
            started = time.monotonic()
            part = entries[first : first + count]
            check({"listVersion": 0, "updateType": "Full", "localAuthorizationList": part})
            first += count
            each = max(time.monotonic() - started, 1e-6) / len(part)
            count = max(1, min(int(CHECK_STEP_S / each), 10 * FIRST_CHECK_ENTRIES))
        head = {key: value for key, value in payload.items() if key != "localAuthorizationList"}
        check({**head, "localAuthorizationList": []})

    async def _call_error(self, unique_id: str, code: str, description: str) -> None:
        log.warning("answering message %s with CALLERROR %s: %s", unique_id, code, description)
        if code == "FormationViolation":
            self._report_invalid(description)
        await self._send(json.dumps([4, unique_id, code, description, {}]))

    def _report_invalid(self, description: str) -> None:
        """The InvalidMessages security event, once per connection: a flood is one event."""
        if not self._invalid_reported:
            self._invalid_reported = True
            self.features.security.raise_event(EventType.INVALID_MESSAGES, description)

    async def _send(self, message: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("> %s", message)
        if self._handling is not None and message.startswith(("[3,", "[4,")):
            self._answered = True
        await self._connection.send(message)

    async def send(
        self, action: str, payload: dict[str, Any], *, validate: bool = True
    ) -> dict[str, Any]:
        """Send one CALL and return the CALLRESULT payload (camelCase, as received).

        ``validate=False`` skips the JSON-schema checks of the request and the answer: used
        when draining a backlog of queued MeterValues, whose shape is fixed by
        ``agent.core.metering`` (and checked by every end-to-end test's CSMS).

        Raises :class:`UnsendableMessage` when the request breaks the schema (nothing was
        sent), OCPPError for a CALLERROR, :class:`MalformedResult` (an OCPPError) for a
        CALLRESULT whose payload breaks the schema, TimeoutError when no answer comes within
        the response timeout. Only the session's sender calls this (one CALL in flight).

        Not the library's ``call()``: it reports a schema-breaking answer with the same
        exceptions as a bad request (and a field it does not know as a TypeError), and
        drops the payload, so a transaction message the CSMS *did* receive would look
        refused and be sent again. The pieces used here are the library's own: message
        framing, schema validation, response routing.
        """
        self.idle.clear()
        try:
            # Idle again only once the answer is checked: the session may close the
            # connection as soon as it is, and the checking awaits (a worker thread).
            return await self._call_once(action, payload, validate)
        finally:
            self.idle.set()

    async def _call_once(
        self, action: str, payload: dict[str, Any], validate: bool
    ) -> dict[str, Any]:
        message = Call(
            unique_id=str(self._unique_id_generator()), action=action, payload=remove_nones(payload)
        )
        if validate:
            try:
                await validate_payload(message, self._ocpp_version)
            except (OCPPError, ValidationError) as exc:
                raise UnsendableMessage(
                    f"{action} breaks the OCPP 1.6 schema: {_cause(exc)}"
                ) from None
        self.pending_ids.add(message.unique_id)
        try:
            async with self._call_lock:
                await self._send(message.to_json())
                try:
                    response = await self._get_specific_response(
                        message.unique_id, self._response_timeout
                    )
                except TimeoutError:
                    raise TimeoutError(
                        f"no answer to {action} within {self._response_timeout:g} s"
                    ) from None
        finally:
            self.pending_ids.discard(message.unique_id)
            # The library awaits the answer with wait_for (see raise_if_cancelling): the
            # sender must not carry on after a swallowed cancellation.
            raise_if_cancelling()
        if response.message_type_id == MessageType.CallError:
            try:
                error = response.to_exception()
            except UnknownCallErrorCodeError as exc:
                # A code OCPP 1.6 does not define (a 2.0.1 code, a typo): still the CSMS's
                # refusal of this CALL, not a reason for the agent to die.
                raise GenericError(
                    description=f"CSMS answered with an unknown error: {exc}"
                ) from None
            raise error
        result = response.payload
        if not isinstance(result, dict):
            raise MalformedResult(action, {}, "the payload is not a JSON object")
        if validate:
            response.action = action
            try:
                await validate_payload(response, self._ocpp_version)
            except (OCPPError, ValidationError) as exc:
                raise MalformedResult(action, result, _cause(exc)) from None
        return result
