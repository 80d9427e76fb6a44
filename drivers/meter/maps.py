"""Modbus energy-meter register maps, as data.

A meter model is a TOML file (``drivers/meter/models/<name>.toml``; see ``template.toml``
for every key). This module loads such a file into frozen dataclasses and provides the
pure functions around it:

- :func:`load_map` reads and validates a map (errors are :class:`FatalDriverError`);
- :func:`plan_reads` groups the registers into as few Modbus reads as the meter allows;
- :func:`decode` turns the registers that came back into a :class:`MeterReading`;
- :func:`encode` is the reverse, for the meter simulator.

There is no I/O here besides reading the map file. All addresses are *protocol* addresses
(0-based): register 30001 of a data sheet is input register address 0.

Values the meter marks as not available are dropped to ``None``, never reported as numbers:
NaN and infinities for ``float32``, and the all-ones/maximum sentinels for integer types
(``0xFFFF`` uint16, ``0x7FFF`` int16, ``0xFFFFFFFF`` uint32, ``0x7FFFFFFF`` int32,
``0xFFFFFFFFFFFFFFFF`` uint64).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, cast

from pymodbus.client.mixin import ModbusClientMixin

from drivers.base import FatalDriverError, MeterReading, PhaseValues, ProtocolError

WordOrder = Literal["big", "little"]
DataTypeName = Literal["float32", "int16", "uint16", "int32", "uint32", "uint64"]

#: Register blocks as read from (or served by) a meter: ``(function_code, start) -> words``.
Blocks = Mapping[tuple[int, int], Sequence[int]]

_DT = ModbusClientMixin.DATATYPE

#: name -> (pymodbus data type, number of registers, "not available" sentinel or None)
_TYPES: Final[dict[str, tuple[Any, int, int | None]]] = {
    "float32": (_DT.FLOAT32, 2, None),
    "int16": (_DT.INT16, 1, 0x7FFF),
    "uint16": (_DT.UINT16, 1, 0xFFFF),
    "int32": (_DT.INT32, 2, 0x7FFFFFFF),
    "uint32": (_DT.UINT32, 2, 0xFFFFFFFF),
    "uint64": (_DT.UINT64, 4, 0xFFFFFFFFFFFFFFFF),
}
_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}

#: Modbus limit for one Read Holding/Input Registers request.
MODBUS_MAX_READ: Final = 125
FUNCTION_CODES: Final = (3, 4)
WORD_ORDERS: Final = ("big", "little")

ENERGY_IMPORT: Final = "energy_import"
#: Every quantity a map may define. Only ``energy_import`` is mandatory.
ENTRY_NAMES: Final = (
    ENERGY_IMPORT,
    "power_total",
    "voltage_l1",
    "voltage_l2",
    "voltage_l3",
    "current_l1",
    "current_l2",
    "current_l3",
    "power_l1",
    "power_l2",
    "power_l3",
    "frequency",
)

MAP_KEYS: Final = {
    "model",
    "description",
    "function_code",
    "word_order",
    "max_registers",
    "max_gap",
    "registers",
}
ENTRY_KEYS: Final = {
    "address",
    "type",
    "scale",
    "exponent_address",
    "function_code",
    "word_order",
}
#: The exponent register (``value * 10**exp``) is a signed 16-bit integer.
EXPONENT_TYPE: Final = "int16"
#: The largest power of ten a scale-factor register may give (SunSpec uses -10..10).
MAX_EXPONENT: Final = 10
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass(frozen=True, slots=True)
class RegisterEntry:
    """One quantity of a map: where it is and how to turn its words into an SI value.

    The SI value is ``raw * scale`` or, with an exponent register,
    ``raw * scale * 10 ** exponent``.
    """

    name: str
    address: int
    data_type: DataTypeName
    function_code: int
    word_order: WordOrder
    scale: float = 1.0
    exponent_address: int | None = None

    @property
    def size(self) -> int:
        """Number of 16-bit registers the value occupies."""
        return _TYPES[self.data_type][1]


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A meter model's register map. ``source`` is the file it was loaded from."""

    model: str
    source: str
    function_code: int
    word_order: WordOrder
    max_registers: int
    entries: tuple[RegisterEntry, ...]
    #: Largest run of unused registers a single read may span (None: any within max).
    max_gap: int | None = None
    description: str = ""

    def entry(self, name: str) -> RegisterEntry | None:
        """The entry called ``name``, or None when the model does not measure it."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None


class PlannedRead(NamedTuple):
    """One Modbus read request: ``length`` registers from ``start`` with ``function_code``.

    Unpacks as ``(function_code, start, count)``.
    """

    function_code: int
    start: int
    length: int


# --------------------------------------------------------------------------- loading


def available_models() -> list[str]:
    """Names of the maps shipped in ``drivers/meter/models`` (without the template)."""
    folder = resources.files("drivers.meter").joinpath("models")
    return sorted(
        item.name.removesuffix(".toml")
        for item in folder.iterdir()
        if item.name.endswith(".toml") and item.name != "template.toml"
    )


def is_model_name(name_or_path: str) -> bool:
    """True for the name of a shipped map (``"sdm630"``), False for a file path."""
    return bool(_NAME_RE.match(name_or_path)) and not name_or_path.endswith(".toml")


def load_map(name_or_path: str) -> RegisterMap:
    """Load a register map by model name (``"sdm630"``) or by path to a TOML file.

    Raises :class:`FatalDriverError` naming the file and the offending key.
    """
    if is_model_name(name_or_path):
        resource = resources.files("drivers.meter").joinpath("models", f"{name_or_path}.toml")
        if not resource.is_file():
            raise FatalDriverError(
                f"unknown meter model {name_or_path!r}; known models: "
                f"{', '.join(available_models())} (or give the path of a .toml map)"
            )
        source = f"drivers/meter/models/{name_or_path}.toml"
        text = resource.read_text(encoding="utf-8")
    else:
        source = str(name_or_path)
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FatalDriverError(f"{source}: cannot read meter map: {exc}") from exc
    return parse_map(text, source=source)


def parse_map(text: str, *, source: str = "<string>") -> RegisterMap:
    """Parse and validate the TOML text of a map. ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FatalDriverError(f"{source}: invalid TOML: {exc}") from exc
    return _Validator(source).map(data)


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> FatalDriverError:
        return FatalDriverError(f"{self.source}: {key}: {problem}")

    def integer(self, value: object, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is outside {low}..{high}")
        return value

    def choice(self, value: object, key: str, choices: Sequence[object]) -> Any:
        if value not in choices:
            expected = ", ".join(repr(c) for c in choices)
            raise self.fail(key, f"{value!r} is not one of {expected}")
        return value

    def unknown(self, table: Mapping[str, object], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(
                    f"{prefix}{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}"
                )

    def map(self, data: dict[str, Any]) -> RegisterMap:
        self.unknown(data, MAP_KEYS, "")
        model = data.get("model")
        if not isinstance(model, str) or not model.strip():
            raise self.fail("model", "a non-empty string is required")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "must be a string")
        function_code = self.choice(data.get("function_code", 4), "function_code", FUNCTION_CODES)
        word_order = self.choice(data.get("word_order", "big"), "word_order", WORD_ORDERS)
        max_registers = self.integer(
            data.get("max_registers", MODBUS_MAX_READ), "max_registers", 1, MODBUS_MAX_READ
        )
        max_gap = data.get("max_gap")
        if max_gap is not None:
            max_gap = self.integer(max_gap, "max_gap", 0, MODBUS_MAX_READ)
        registers = data.get("registers")
        if not isinstance(registers, dict):
            raise self.fail("registers", "a table of registers is required")
        entries: list[RegisterEntry] = []
        for name, raw in registers.items():
            key = f"registers.{name}"
            if name not in ENTRY_NAMES:
                raise self.fail(key, f"unknown quantity; allowed: {', '.join(ENTRY_NAMES)}")
            if not isinstance(raw, dict):
                raise self.fail(key, "must be a table such as { address = 0, type = ... }")
            entries.append(self.entry(name, raw, function_code, word_order, max_registers))
        if not any(e.name == ENERGY_IMPORT for e in entries):
            raise self.fail(f"registers.{ENERGY_IMPORT}", "missing (it is mandatory)")
        self.check_overlaps(entries)
        entries.sort(key=lambda e: ENTRY_NAMES.index(e.name))
        return RegisterMap(
            model=model.strip(),
            source=self.source,
            function_code=function_code,
            word_order=word_order,
            max_registers=max_registers,
            max_gap=max_gap,
            entries=tuple(entries),
            description=description,
        )

    def entry(
        self,
        name: str,
        raw: dict[str, Any],
        function_code: int,
        word_order: WordOrder,
        max_registers: int,
    ) -> RegisterEntry:
        key = f"registers.{name}"
        self.unknown(raw, ENTRY_KEYS, f"{key}.")
        if "address" not in raw:
            raise self.fail(f"{key}.address", "missing")
        if "type" not in raw:
            raise self.fail(f"{key}.type", "missing")
        data_type = cast(DataTypeName, self.choice(raw["type"], f"{key}.type", tuple(_TYPES)))
        size = _TYPES[data_type][1]
        address = self.integer(raw["address"], f"{key}.address", 0, 0x10000 - size)
        if size > max_registers:
            raise self.fail(f"{key}.type", f"{data_type} does not fit in max_registers")
        scale = raw.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise self.fail(f"{key}.scale", f"must be a number, got {scale!r}")
        if not math.isfinite(scale) or scale == 0:
            raise self.fail(f"{key}.scale", f"must be a finite non-zero number, got {scale!r}")
        exponent_address = raw.get("exponent_address")
        if exponent_address is not None:
            if data_type == "float32":
                raise self.fail(f"{key}.exponent_address", "not allowed with type float32")
            exponent_address = self.integer(exponent_address, f"{key}.exponent_address", 0, 0xFFFF)
        return RegisterEntry(
            name=name,
            address=address,
            data_type=data_type,
            function_code=self.choice(
                raw.get("function_code", function_code), f"{key}.function_code", FUNCTION_CODES
            ),
            word_order=self.choice(
                raw.get("word_order", word_order), f"{key}.word_order", WORD_ORDERS
            ),
            scale=float(scale),
            exponent_address=exponent_address,
        )

    def check_overlaps(self, entries: list[RegisterEntry]) -> None:
        """No two entries share a register, except exact aliases (same register, same type)."""
        used: dict[tuple[int, int], str] = {}
        seen: list[RegisterEntry] = []
        for entry in entries:
            if any(_same_register(entry, other) for other in seen):
                continue
            seen.append(entry)
            for offset in range(entry.size):
                slot = (entry.function_code, entry.address + offset)
                if slot in used:
                    raise self.fail(
                        f"registers.{entry.name}.address",
                        f"register {slot[1]} is already used by {used[slot]}",
                    )
                used[slot] = f"registers.{entry.name}"
        for entry in entries:
            if entry.exponent_address is None:
                continue
            slot = (entry.function_code, entry.exponent_address)
            if slot in used:
                raise self.fail(
                    f"registers.{entry.name}.exponent_address",
                    f"register {slot[1]} is already used by {used[slot]}",
                )


def _same_register(a: RegisterEntry, b: RegisterEntry) -> bool:
    return (a.function_code, a.address, a.data_type, a.word_order, a.exponent_address) == (
        b.function_code,
        b.address,
        b.data_type,
        b.word_order,
        b.exponent_address,
    )


# --------------------------------------------------------------------------- planning


def _spans(register_map: RegisterMap) -> list[tuple[int, int, int]]:
    """(function_code, address, size) of every register the map needs, exponents included."""
    spans: set[tuple[int, int, int]] = set()
    for entry in register_map.entries:
        spans.add((entry.function_code, entry.address, entry.size))
        if entry.exponent_address is not None:
            spans.add((entry.function_code, entry.exponent_address, 1))
    return sorted(spans)


def plan_reads(register_map: RegisterMap) -> list[PlannedRead]:
    """Group the map's registers into as few reads as possible.

    A read never exceeds ``max_registers`` and never spans more than ``max_gap`` unused
    registers. Each item unpacks as ``(function_code, start, count)``.
    """
    reads: list[PlannedRead] = []
    limit = register_map.max_registers
    max_gap = register_map.max_gap
    current: list[int] | None = None  # [function_code, start, end (exclusive)]
    for function_code, address, size in _spans(register_map):
        end = address + size
        if current is not None and current[0] == function_code:
            gap = address - current[2]
            fits = max(end, current[2]) - current[1] <= limit
            if fits and (max_gap is None or gap <= max_gap):
                current[2] = max(current[2], end)
                continue
        if current is not None:
            reads.append(PlannedRead(current[0], current[1], current[2] - current[1]))
        current = [function_code, address, end]
    if current is not None:
        reads.append(PlannedRead(current[0], current[1], current[2] - current[1]))
    return reads


# --------------------------------------------------------------------------- decoding


def _words(blocks: Blocks, function_code: int, address: int, size: int) -> Sequence[int] | None:
    for (block_fc, start), words in blocks.items():
        if block_fc == function_code and start <= address and address + size <= start + len(words):
            offset = address - start
            return words[offset : offset + size]
    return None


def _raw(words: Sequence[int], data_type: str, word_order: WordOrder) -> float | int | None:
    """The number in ``words``, or None when it is a NaN, infinity or sentinel."""
    pymodbus_type, _size, sentinel = _TYPES[data_type]
    for word in words:
        if not 0 <= word <= 0xFFFF:
            raise ProtocolError(f"register value {word!r} is not a 16-bit word")
    value = ModbusClientMixin.convert_from_registers(list(words), pymodbus_type, word_order)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, int):  # pragma: no cover - pymodbus returns scalars here
        raise ProtocolError(f"cannot decode {list(words)} as {data_type}")
    return None if value == sentinel else value


def decode_entry(entry: RegisterEntry, blocks: Blocks) -> float | None:
    """The SI value of one entry, or None when absent, not available or not read."""
    words = _words(blocks, entry.function_code, entry.address, entry.size)
    if words is None:
        return None
    raw = _raw(words, entry.data_type, entry.word_order)
    if raw is None:
        return None
    value = float(raw) * entry.scale
    if entry.exponent_address is not None:
        exp_words = _words(blocks, entry.function_code, entry.exponent_address, 1)
        if exp_words is None:
            return None
        exponent = _raw(exp_words, EXPONENT_TYPE, "big")
        if exponent is None or not -MAX_EXPONENT <= int(exponent) <= MAX_EXPONENT:
            return None  # not available (SunSpec -32768), or no real meter's scale
        value *= 10.0 ** int(exponent)
    return value if math.isfinite(value) else None


def decode(register_map: RegisterMap, blocks: Blocks) -> MeterReading:
    """Turn register blocks (``(function_code, start) -> words``) into a reading.

    Raises :class:`ProtocolError` when the import energy is missing, not a number, a
    sentinel or negative: a reading without energy is never returned.
    """
    values: dict[str, float | None] = {
        entry.name: decode_entry(entry, blocks) for entry in register_map.entries
    }
    energy_entry = register_map.entry(ENERGY_IMPORT)
    assert energy_entry is not None  # guaranteed by the loader
    energy = values.get(ENERGY_IMPORT)
    where = f"{ENERGY_IMPORT} (register {energy_entry.address} = 0x{energy_entry.address:04X})"
    if energy is None:
        raise ProtocolError(f"{where} is missing or not available (NaN/sentinel)")
    if energy < 0:
        raise ProtocolError(f"{where} is negative: {energy} Wh")

    def phases(prefix: str) -> PhaseValues:
        return (values.get(f"{prefix}_l1"), values.get(f"{prefix}_l2"), values.get(f"{prefix}_l3"))

    return MeterReading(
        energy_wh=energy,
        power_w=values.get("power_total"),
        voltage_v=phases("voltage"),
        current_a=phases("current"),
        power_phase_w=phases("power"),
        frequency_hz=values.get("frequency"),
    )


# --------------------------------------------------------------------------- encoding


def _reading_values(reading: MeterReading) -> dict[str, float | None]:
    return {
        ENERGY_IMPORT: reading.energy_wh,
        "power_total": reading.power_w,
        "voltage_l1": reading.voltage_v[0],
        "voltage_l2": reading.voltage_v[1],
        "voltage_l3": reading.voltage_v[2],
        "current_l1": reading.current_a[0],
        "current_l2": reading.current_a[1],
        "current_l3": reading.current_a[2],
        "power_l1": reading.power_phase_w[0],
        "power_l2": reading.power_phase_w[1],
        "power_l3": reading.power_phase_w[2],
        "frequency": reading.frequency_hz,
    }


def _fits(value: float, data_type: str, divisor: float) -> bool:
    low, high = _INT_RANGES[data_type]
    raw = round(value / divisor)
    return low <= raw <= high and raw != _TYPES[data_type][2]


def _pick_exponent(entries: list[tuple[RegisterEntry, float | None]]) -> int:
    """Smallest decade exponent (-3..9) at which every value of a shared exponent fits."""
    for exponent in range(-3, 10):
        if all(
            value is None or _fits(value, entry.data_type, entry.scale * 10.0**exponent)
            for entry, value in entries
        ):
            return exponent
    raise ValueError(f"values {[v for _, v in entries]} do not fit any exponent")


def _to_words(value: float | None, entry: RegisterEntry, divisor: float) -> list[int]:
    pymodbus_type, _size, sentinel = _TYPES[entry.data_type]
    number: int | float
    if entry.data_type == "float32":
        number = math.nan if value is None else value / divisor
    elif value is None:
        assert sentinel is not None
        number = sentinel
    else:
        number = round(value / divisor)
        low, high = _INT_RANGES[entry.data_type]
        if not low <= number <= high:
            raise ValueError(f"{entry.name}={value} does not fit {entry.data_type}")
    return ModbusClientMixin.convert_to_registers(number, pymodbus_type, entry.word_order)


def encode(register_map: RegisterMap, reading: MeterReading) -> dict[tuple[int, int], list[int]]:
    """The registers a meter of this model shows for ``reading``: ``(fc, address) -> words``.

    A ``None`` value is written as NaN (float32) or the type's sentinel. Exponent registers
    get the smallest decade exponent at which the values fit. Raises ValueError when a value
    does not fit its integer type.
    """
    values = _reading_values(reading)
    by_exponent: dict[tuple[int, int], list[tuple[RegisterEntry, float | None]]] = {}
    for entry in register_map.entries:
        if entry.exponent_address is not None:
            slot = (entry.function_code, entry.exponent_address)
            by_exponent.setdefault(slot, []).append((entry, values[entry.name]))
    exponents = {slot: _pick_exponent(group) for slot, group in by_exponent.items()}
    out: dict[tuple[int, int], list[int]] = {}
    for slot, exponent in exponents.items():
        out[slot] = ModbusClientMixin.convert_to_registers(exponent, _DT.INT16, "big")
    for entry in register_map.entries:
        divisor = entry.scale
        if entry.exponent_address is not None:
            divisor *= 10.0 ** exponents[(entry.function_code, entry.exponent_address)]
        out[(entry.function_code, entry.address)] = _to_words(values[entry.name], entry, divisor)
    return out
