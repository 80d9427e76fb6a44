"""The OCPP 1.6 configuration keys: registry, validation and the ChangeConfiguration rules.

Every key has a type, an access mode (read-only, read-write, write-only), whether a change
needs a reboot to take effect, and a default. Values travel as strings (OCPP 1.6 section 9);
this module parses and checks them once so that the rest of the agent reads typed values.

No I/O: persistence happens through the ``on_change`` callback; the agent stores the values
in SQLite and subscribes to changes to apply them at once (e.g. a new
MeterValueSampleInterval reschedules sampling).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: Measurands the agent can report (what the meter and controller give us).
SUPPORTED_MEASURANDS = (
    "Energy.Active.Import.Register",
    "Power.Active.Import",
    "Current.Import",
    "Voltage",
    "Current.Offered",
    "Power.Offered",
    "Frequency",
)

#: Every measurand OCPP 1.6 defines (to tell "unknown" from "not supported").
OCPP_MEASURANDS = (
    *SUPPORTED_MEASURANDS,
    "Current.Export",
    "Energy.Active.Export.Register",
    "Energy.Reactive.Export.Register",
    "Energy.Reactive.Import.Register",
    "Energy.Active.Export.Interval",
    "Energy.Active.Import.Interval",
    "Energy.Reactive.Export.Interval",
    "Energy.Reactive.Import.Interval",
    "Power.Active.Export",
    "Power.Factor",
    "Power.Reactive.Export",
    "Power.Reactive.Import",
    "RPM",
    "SoC",
    "Temperature",
)

PHASE_ROTATIONS = ("NotApplicable", "Unknown", "RST", "RTS", "SRT", "STR", "TRS", "TSR")


class Access(enum.Enum):
    READ_ONLY = "R"
    READ_WRITE = "RW"
    WRITE_ONLY = "W"  # secrets: never returned by GetConfiguration, never logged


class Kind(enum.Enum):
    BOOL = "bool"
    INT = "int"
    CSL = "csl"  # comma-separated list
    STR = "str"


class ChangeResult(enum.StrEnum):
    """ChangeConfiguration.conf status values."""

    ACCEPTED = "Accepted"
    REJECTED = "Rejected"
    REBOOT_REQUIRED = "RebootRequired"
    NOT_SUPPORTED = "NotSupported"


@dataclass(frozen=True, slots=True)
class KeySpec:
    name: str
    kind: Kind
    default: str
    access: Access = Access.READ_WRITE
    reboot_required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    #: For CSL keys: the allowed items; for STR keys: the allowed values (None = any).
    choices: tuple[str, ...] | None = None
    max_items: int | None = None
    min_length: int | None = None
    max_length: int = 500

    def parse(self, raw: str) -> str | None:
        """Return the normalised value, or None when ``raw`` is not valid for this key."""
        raw = raw.strip()
        if self.kind is Kind.BOOL:
            low = raw.lower()
            return low if low in ("true", "false") else None
        if self.kind is Kind.INT:
            try:
                number = int(raw, 10)
            except ValueError:
                return None
            if self.minimum is not None and number < self.minimum:
                return None
            if self.maximum is not None and number > self.maximum:
                return None
            return str(number)
        if self.kind is Kind.CSL:
            items = [item.strip() for item in raw.split(",")] if raw else []
            if any(not item for item in items):
                return None
            if self.choices is not None and any(item not in self.choices for item in items):
                return None
            if self.max_items is not None and len(items) > self.max_items:
                return None
            return ",".join(items)
        if self.min_length is not None and len(raw) < self.min_length:
            return None
        if len(raw) > self.max_length:
            return None
        if self.choices is not None and raw not in self.choices:
            return None
        return raw


def bool_key(name: str, default: bool, **kw: object) -> KeySpec:
    return KeySpec(name, Kind.BOOL, "true" if default else "false", **kw)  # type: ignore[arg-type]


def int_key(name: str, default: int, **kw: object) -> KeySpec:
    return KeySpec(name, Kind.INT, str(default), **kw)  # type: ignore[arg-type]


def measurands_key(name: str, default: str) -> KeySpec:
    return KeySpec(name, Kind.CSL, default, choices=SUPPORTED_MEASURANDS, max_items=10)


RO = Access.READ_ONLY
MAX_CSL_ITEMS = 10
#: ConnectorPhaseRotation items: "<connectorId>.<rotation>" (OCPP 1.6 9.1.7).
PHASE_ROTATION_ITEMS = tuple(
    f"{connector}.{rotation}" for connector in range(33) for rotation in PHASE_ROTATIONS
)

ChangeListener = Callable[[str, str], None]


class ConfigKeys:
    """The live values of the OCPP configuration keys.

    Args:
        specs: every key the agent knows, in GetConfiguration's order (assembled from
            the feature profiles' key specs: ``agent.features.registry``).
        stored: values persisted by an earlier run (they win over ``overrides``).
        overrides: initial values from the config file's ``[ocpp]`` section.
        fixed: values the agent sets itself (e.g. NumberOfConnectors), read-only.

    Raises:
        ValueError: an override names an unknown key or has an invalid value.
    """

    def __init__(
        self,
        specs: Sequence[KeySpec],
        *,
        stored: dict[str, str] | None = None,
        overrides: dict[str, object] | None = None,
        fixed: dict[str, str] | None = None,
    ) -> None:
        self._specs = tuple(specs)
        self._by_name = {spec.name: spec for spec in self._specs}
        self._values = {spec.name: spec.default for spec in self._specs}
        self._listeners: list[ChangeListener] = []
        for name, value in (overrides or {}).items():
            spec = self._by_name.get(name)
            if spec is None:
                raise ValueError(f"[ocpp] {name}: unknown OCPP configuration key")
            text = _to_text(value)
            parsed = spec.parse(text)
            if parsed is None:
                raise ValueError(f"[ocpp] {name}: invalid value {text!r}")
            self._values[name] = parsed
        for name, value in (stored or {}).items():
            spec = self._by_name.get(name)
            if spec is not None and spec.access is not Access.READ_ONLY:
                parsed = spec.parse(value)
                if parsed is not None:
                    self._values[name] = parsed
        for name, value in (fixed or {}).items():
            self._values[name] = value

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(name, value)`` after every accepted change (to persist or apply)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ typed reads
    def raw(self, name: str) -> str:
        return self._values[name]

    def get_int(self, name: str) -> int:
        return int(self._values[name])

    def get_bool(self, name: str) -> bool:
        return self._values[name] == "true"

    def get_list(self, name: str) -> list[str]:
        value = self._values[name]
        return value.split(",") if value else []

    # ------------------------------------------------------------------ OCPP operations
    def get_configuration(
        self, keys: Iterable[str] | None
    ) -> tuple[list[tuple[str, bool, str]], list[str]]:
        """GetConfiguration: return ``(known, unknown)``.

        ``known`` holds ``(key, readonly, value)``; write-only keys are never included in
        a full listing, and when asked for by name they are reported as unknown (their
        value must never leave the charger).
        """
        if keys is None:
            names = [spec.name for spec in self._specs if spec.access is not Access.WRITE_ONLY]
            unknown: list[str] = []
        else:
            names, unknown = [], []
            for key in keys:
                spec = self._by_name.get(key)
                if spec is None or spec.access is Access.WRITE_ONLY:
                    unknown.append(key)
                else:
                    names.append(key)
        known = [
            (name, self._by_name[name].access is Access.READ_ONLY, self._values[name])
            for name in names
        ]
        return known, unknown

    def change_configuration(self, key: str, value: str) -> ChangeResult:
        """ChangeConfiguration: validate, store, notify listeners; return the status."""
        spec = self._by_name.get(key)
        if spec is None:
            return ChangeResult.NOT_SUPPORTED
        if spec.access is Access.READ_ONLY:
            return ChangeResult.REJECTED
        parsed = spec.parse(value)
        if parsed is None:
            return ChangeResult.REJECTED
        self.set(key, parsed)
        return ChangeResult.REBOOT_REQUIRED if spec.reboot_required else ChangeResult.ACCEPTED

    def is_secret(self, key: str) -> bool:
        """True for keys whose values must never be returned or logged."""
        spec = self._by_name.get(key)
        return spec is not None and spec.access is Access.WRITE_ONLY

    def set(self, key: str, value: str) -> None:
        """Store an already validated value and notify listeners."""
        self._values[key] = value
        for listener in list(self._listeners):
            listener(key, value)


def _to_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)
