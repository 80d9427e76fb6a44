"""A pure pre-check of every raw frame from the CSMS, before the ``ocpp`` library sees it.

:func:`precheck` looks at one WebSocket message and returns exactly one decision:

* :class:`Pass`: hand the parsed frame on (a CALL to the library's router, a CALLRESULT or
  CALLERROR to the sender, once its id is known to be ours: that check needs state and
  stays with the caller);
* :class:`Answer`: answer this CALL at once with the given CALLERROR or CALLRESULT frame,
  without the library (OCPP-J 1.6 section 4.2.3, Table 7 codes and descriptions);
* :class:`Drop`: nothing can be answered (no readable unique id, not JSON, a response);
  log :attr:`Drop.reason` (rate-limited by the caller: it names no CSMS text).

Never raises, for any input (tests/agent/test_precheck.py fuzzes it). It does nothing that
grows with the frame beyond one C-speed JSON parse, and refuses before that parse what is
too large. Choices, each from the specification:

* **Size.** A frame longer than ``frame_limit(SendLocalListMaxLength)`` characters is
  refused unparsed: a CALLERROR ``FormationViolation`` naming the limit when a bounded scan
  of its first :data:`ID_SCAN_CHARS` characters finds ``[2, "<id>", "<action>"``, else
  dropped. The limit holds a SendLocalList of SendLocalListMaxLength entries with every
  optional field, idTags and parentIdTags of 20 characters each written as ``\\uXXXX``
  escapes of non-BMP characters, and indentation (:data:`ENTRY_MAX_CHARS` per entry), and
  is never below :data:`MIN_FRAME_CHARS`. (OCPP 2.0.1 answers a message over
  BytesPerMessage with FormatViolation, 1.6's FormationViolation.)
* **Numbers** (in a CALL; a CALLRESULT or CALLERROR may hold any integer Python can read,
  as the agent judges the values it asked for: the library's schemas bound none).
  ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259 section 6):
  ``FormationViolation``. An integer outside 64 bits (what the agent's SQLite store can
  hold; Python refuses integers over 4,300 digits outright, and the library then answered
  nothing) or a number that overflows a double (``1e400``) does not fit any OCPP data type:
  ``TypeConstraintViolation``. A ``limit`` or ``minChargingRate`` (SetChargingProfile,
  RemoteStartTransaction) over :data:`MAX_RATE` in size, say ``1e308``, is a valid number
  but an impossible value: ``PropertyConstraintViolation`` (the library's ``multipleOf``
  check would raise ``decimal.InvalidOperation``: an InternalError).
* **Lone UTF-16 surrogates** (``"\\ud800"``: valid JSON syntax, but no Unicode character,
  so no UTF-8 can carry it and the agent cannot store, log or send it back):
  ``PropertyConstraintViolation``, "syntactically correct but at least one field contains
  an invalid value". Not FormationViolation: the frame itself is well-formed JSON.
* **Actions.** Not an OCPP 1.6 action: ``NotImplemented`` ("Requested Action is not known
  by receiver"); an OCPP 1.6 action (the core specification and the security whitepaper)
  this charge point has no handler for: ``NotSupported`` ("Requested Action is recognized
  but not supported by the receiver").
* **SendLocalList over SendLocalListMaxLength**: a CALLRESULT ``{"status": "Failed"}``
  (UpdateStatus Failed, "could not be updated"), before the frame is parsed (its
  ``"idTag":`` keys are counted; an entry whose key is written with escapes is counted
  after parsing, before any entry is looked at). OCPP 1.6
  sets no maximum in the PDU (localAuthorizationList is 0..*), so no occurrence constraint
  of the message is broken; SendLocalListMaxLength is a capability the CSMS reads, and
  Failed is what the agent already answered (tests/e2e/test_offline.py). OCPP 2.0.1 later
  allows an OccurrenceConstraintViolation CALLERROR instead (MAY).
* **Nesting** deeper than :data:`MAX_DEPTH` levels: ``FormationViolation`` (as the adapter).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ocpp.v16.enums import Action

#: OCPP-J 1.6 section 4.2.3, Table 7: the description of every CallError code.
DESCRIPTIONS = {
    "NotImplemented": "Requested Action is not known by receiver",
    "NotSupported": "Requested Action is recognized but not supported by the receiver",
    "InternalError": "An internal error occurred and the receiver was not able to process "
    "the requested Action successfully",
    "ProtocolError": "Payload for Action is incomplete",
    "SecurityError": "During the processing of Action a security issue occurred preventing "
    "receiver from completing the Action successfully",
    "FormationViolation": "Payload for Action is syntactically incorrect or not conform the "
    "PDU structure for Action",
    "PropertyConstraintViolation": "Payload is syntactically correct but at least one field "
    "contains an invalid value",
    "OccurenceConstraintViolation": "Payload for Action is syntactically correct but at least "
    "one of the fields violates occurence constraints",
    "TypeConstraintViolation": "Payload for Action is syntactically correct but at least one "
    'of the fields violates data type constraints (e.g. "somestring": 12)',
    "GenericError": "Any other error not covered by the previous ones",
}

#: Every OCPP 1.6 action name (core specification and security whitepaper).
OCPP16_ACTIONS = frozenset(a.value for a in Action)

#: Characters of one SendLocalList entry at most: ``{"idTag": .., "idTagInfo": {"expiryDate":
#: .., "parentIdTag": .., "status": "ConcurrentTx"}}`` with both tags 20 non-BMP characters
#: written as surrogate-pair escapes (12 characters each), a 64-character timestamp, and
#: 160 characters of indentation and spacing.
ENTRY_MAX_CHARS = (
    len('{"idTag":"","idTagInfo":{"expiryDate":"","parentIdTag":"","status":"ConcurrentTx"}},')
    + 2 * 20 * 12
    + 64
    + 160
)
#: The rest of a SendLocalList frame (id, action, listVersion, updateType), generously.
FRAME_OVERHEAD_CHARS = 4096
#: No frame limit is below this (every other OCPP 1.6 CALL at the default limits fits).
MIN_FRAME_CHARS = 64 * 1024
#: How far into an oversized or unparsable frame the unique id is looked for.
# (A unique id is at most 36 characters, but written as JSON escapes a character outside
# the BMP takes 12 ("\ud83d\ude00"): 432 for the id, plus the action and the brackets;
# the hostile-CSMS test found ids that 256 did not reach.)
ID_SCAN_CHARS = 640
#: The deepest nesting of lists and objects accepted (the deepest OCPP 1.6 CALL nests 6).
MAX_DEPTH = 32
#: The largest ``limit`` / ``minChargingRate`` accepted (A or W): far above any charger,
#: far below what breaks the library's decimal ``multipleOf`` check (about 1e27).
MAX_RATE = 1e9
#: Integers a frame may hold: 64-bit signed (the store's range; OCPP's are 32-bit).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Digits of the longest integer looked at (the range above has 19; sign excluded).
_MAX_INT_CHARS = 20


def frame_limit(send_local_list_max_length: int) -> int:
    """The longest frame (in characters) accepted when SendLocalListMaxLength is ``n``."""
    return max(MIN_FRAME_CHARS, FRAME_OVERHEAD_CHARS + send_local_list_max_length * ENTRY_MAX_CHARS)


#: The frame limit at the default SendLocalListMaxLength (1000): 792,096 characters.
MAX_FRAME_CHARS = frame_limit(1000)


@dataclass(frozen=True, slots=True)
class Pass:
    """Hand on: ``frame`` is the parsed message (a list, its first item 2, 3 or 4)."""

    frame: list[Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer at once (the library never sees the frame): send :meth:`to_json`."""

    unique_id: str
    #: A CallError code, or None for a CALLRESULT carrying ``payload``.
    code: str | None
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        if self.code is None:
            return json.dumps([3, self.unique_id, self.payload])
        return json.dumps([4, self.unique_id, self.code, self.description, self.details])


@dataclass(frozen=True, slots=True)
class Drop:
    """Nothing to answer. ``reason`` is one line with no text from the CSMS in it."""

    reason: str


Decision = Pass | Answer | Drop


def _error(unique_id: str, code: str, cause: str) -> Answer:
    return Answer(unique_id, code, DESCRIPTIONS[code], {"cause": cause})


class _Refused(ValueError):
    def __init__(self, code: str, cause: str) -> None:
        super().__init__(cause)
        self.code = code
        self.cause = cause


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_CHARS:
        raise _Refused("TypeConstraintViolation", f"an integer of {len(text)} digits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Refused("TypeConstraintViolation", "an integer outside 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("TypeConstraintViolation", "a number too large for a double")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused("FormationViolation", f"{text} is not a JSON number")


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)
#: For a CALLRESULT/CALLERROR: any integer Python reads (the agent judges the values it
#: asked for itself: a 10**400 s interval is clamped, a transactionId beyond 64 bits is
#: no usable answer and the message is retried), no NaN/Infinity.
_RESPONSE_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_constant=_parse_constant)
#: ``[3,`` or ``[4,`` at the start of a frame.
_RESPONSE_HEAD = re.compile(r"\s*\[\s*[34]\s*,")
#: ``[2, "<id>", "<action>"`` at the start of a frame (the id may hold escapes).
_HEAD = re.compile(r'\s*\[\s*2\s*,\s*("(?:[^"\\]|\\.){1,440}")\s*,\s*("(?:[^"\\]|\\.){0,120}")')
#: An ``"idTag"`` key (a string value is never followed by a colon in JSON).
_ID_TAG_KEY = re.compile(r'"idTag"\s*:')


def _id_tag_keys(raw: str) -> int:
    return sum(1 for _ in _ID_TAG_KEY.finditer(raw))


def _head(raw: str) -> tuple[str, str] | None:
    """The unique id and action of a CALL, read from its first characters only."""
    match = _HEAD.match(raw[:ID_SCAN_CHARS])
    if match is None:
        return None
    try:
        unique_id, action = json.loads(match.group(1)), json.loads(match.group(2))
    except ValueError:
        return None
    if not isinstance(unique_id, str) or not 0 < len(unique_id) <= 36:
        return None
    return unique_id, action


#: What can leave a lone surrogate after parsing: its escape, or the character itself.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
#: The same in ASCII text: only the escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_surrogate(text: str) -> bool:
    if text.isascii():  # (known without a look at the characters) no surrogate character
        return "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    return _SURROGATE.search(text) is not None


def _too_deep(value: Any) -> bool:
    """Whether lists and objects nest more than :data:`MAX_DEPTH` levels in ``value`` (as
    :func:`_walk` finds, a level at a time and without a look at strings and numbers:
    about a tenth of its time for a SendLocalList)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return True
        inner = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                if type(child) is dict or type(child) is list:
                    inner.append(child)
        level = inner
    return False


def _walk(value: Any, surrogates: bool) -> str | None:
    """ "deep" or "surrogate" when the parsed value is refused for that, else None."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                return "deep"
            if isinstance(item, dict):
                if surrogates and any(_is_surrogate(key) for key in item):
                    return "surrogate"
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif surrogates and isinstance(item, str) and _is_surrogate(item):
            return "surrogate"
    return None


def _rate_problem(action: str, payload: dict[str, Any]) -> str | None:
    """A ``limit`` or ``minChargingRate`` too large to be a rate (or to check), if any."""
    profile = payload.get(
        "csChargingProfiles" if action == "SetChargingProfile" else "chargingProfile"
    )
    schedule = profile.get("chargingSchedule") if isinstance(profile, dict) else None
    if not isinstance(schedule, dict):
        return None
    values: list[tuple[str, Any]] = [("minChargingRate", schedule.get("minChargingRate"))]
    periods = schedule.get("chargingSchedulePeriod")
    if isinstance(periods, list):
        values += [("limit", p.get("limit")) for p in periods if isinstance(p, dict)]
    for name, value in values:
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > MAX_RATE:
            return f"{name} {value:g} is out of range (at most {MAX_RATE:g})"
    return None


def precheck(
    raw: str | bytes, *, handled: Collection[str], send_local_list_max_length: int
) -> Decision:
    """The decision for one frame from the CSMS (see the module's docstring). Never raises.

    ``handled``: the actions this charge point has a handler for;
    ``send_local_list_max_length``: the SendLocalListMaxLength key's value.
    """
    try:
        return _precheck(raw, handled, send_local_list_max_length)
    except Exception as exc:  # a bug here must not end the receive loop
        return Drop(f"pre-check failed: {type(exc).__name__}")


def _unparsed(raw: str, code: str, cause: str) -> Decision:
    """A CALL that cannot be parsed: answered when its id can be read, else dropped."""
    head = _head(raw)
    if head is None:
        return Drop(f"dropped a frame of {len(raw)} characters without a readable CALL id: {cause}")
    return _error(head[0], code, cause)


def _precheck(raw: str | bytes, handled: Collection[str], max_entries: int) -> Decision:
    if isinstance(raw, bytes):
        return Drop(f"dropped a binary WebSocket frame ({len(raw)} bytes): OCPP-J is text")
    limit = frame_limit(max_entries)
    if len(raw) > limit:
        return _unparsed(
            raw,
            "FormationViolation",
            f"the frame has {len(raw)} characters; the limit is {limit}"
            f" (SendLocalListMaxLength {max_entries})",
        )
    head = _head(raw)
    # Counted before anything is parsed: a list over the limit costs no parsing (and leaves
    # no parsed objects behind). Exact for every entry whose "idTag" key is written plainly;
    # one written with escapes is counted after parsing instead. ('"idTag"' is found at
    # each key and at any value "idTag": the keys are counted only when it is too often.)
    if (
        head is not None
        and head[1] == "SendLocalList"
        and raw.count('"idTag"') > max_entries
        and _id_tag_keys(raw) > max_entries
    ):
        return Answer(head[0], None, payload={"status": "Failed"})
    try:
        frame = _DECODER.decode(raw)
    except _Refused as exc:
        if _RESPONSE_HEAD.match(raw) is None:
            return _unparsed(raw, exc.code, exc.cause)
        try:  # an answer to a CALL of ours: its integers are the agent's to judge
            frame = _RESPONSE_DECODER.decode(raw)
        except (ValueError, RecursionError):
            return Drop(f"dropped a response that cannot be read ({len(raw)} characters)")
    except RecursionError:
        return _unparsed(raw, "FormationViolation", "the frame nests too deeply to parse")
    except ValueError:
        return Drop(f"dropped a frame that is not JSON ({len(raw)} characters)")
    if (
        not isinstance(frame, list)
        or not frame
        or type(frame[0]) is not int
        or frame[0] not in (2, 3, 4)
    ):
        return Drop(f"dropped a frame that is not an OCPP-J message ({len(raw)} characters)")
    unique_id = frame[1] if len(frame) > 1 else None
    if not isinstance(unique_id, str) or not 0 < len(unique_id) <= 36:
        return Drop(f"dropped a message without a valid unique id ({len(raw)} characters)")
    surrogates = _is_surrogate(raw)
    maybe_deep = raw.count("[") + raw.count("{") > MAX_DEPTH
    if frame[0] != 2:
        if (frame[0] == 3 and len(frame) != 3) or (frame[0] == 4 and not 4 <= len(frame) <= 5):
            return Drop("dropped a malformed CALLRESULT/CALLERROR")
        if surrogates and _walk(frame, surrogates) is not None:
            return Drop("dropped a CALLRESULT/CALLERROR nested too deeply or with a lone surrogate")
        if maybe_deep and _too_deep(frame):
            return Drop("dropped a CALLRESULT/CALLERROR nested too deeply or with a lone surrogate")
        return Pass(frame)
    if len(frame) != 4 or not isinstance(frame[2], str) or not isinstance(frame[3], dict):
        return _error(unique_id, "FormationViolation", "CALL must be [2, id, action, {payload}]")
    action, payload = frame[2], frame[3]
    if action not in OCPP16_ACTIONS:
        return _error(unique_id, "NotImplemented", f"{action[:64]!r} is not an OCPP 1.6 action")
    if action not in handled:
        return _error(unique_id, "NotSupported", f"{action} is not supported by this charge point")
    if action == "SendLocalList":
        entries = payload.get("localAuthorizationList")
        if isinstance(entries, list) and len(entries) > max_entries:
            return Answer(unique_id, None, payload={"status": "Failed"})
    if surrogates or maybe_deep:
        problem = (
            _walk(payload, surrogates) if surrogates else "deep" if _too_deep(payload) else None
        )
        if problem == "deep":
            return _error(
                unique_id, "FormationViolation", f"the payload nests more than {MAX_DEPTH} levels"
            )
        if problem == "surrogate":
            return _error(
                unique_id,
                "PropertyConstraintViolation",
                "a string holds a lone UTF-16 surrogate (no Unicode character)",
            )
    if action in ("SetChargingProfile", "RemoteStartTransaction"):
        cause = _rate_problem(action, payload)
        if cause is not None:
            return _error(unique_id, "PropertyConstraintViolation", cause)
    return Pass(frame)
