"""Register maps: loading, validation, read planning, decoding and encoding (no I/O).

Expected register contents are built here with ``struct`` from the meters' documented
formats, independently of the code under test.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pytest

from drivers.base import FatalDriverError, MeterReading, ProtocolError
from drivers.meter.maps import (
    ENTRY_KEYS,
    ENTRY_NAMES,
    MAP_KEYS,
    RegisterMap,
    available_models,
    decode,
    encode,
    load_map,
    plan_reads,
)

BUNDLED = ("sdm630", "sdm120", "abb_b23", "em340")


def words(fmt: str, *values: float | int) -> list[int]:
    """Big-endian packing of ``values`` split into 16-bit words."""
    raw = struct.pack(fmt, *values)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def low_word_first(fmt: str, value: int) -> list[int]:
    return list(reversed(words(fmt, value)))


def write_map(tmp_path: Path, text: str, name: str = "meter.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- loading


def test_bundled_models_are_listed_and_load() -> None:
    assert set(BUNDLED) <= set(available_models())
    assert "template" not in available_models()
    for name in BUNDLED:
        register_map = load_map(name)
        assert register_map.entry("energy_import") is not None
        assert register_map.source.endswith(f"{name}.toml")


def test_template_loads_and_documents_every_key() -> None:
    text = (Path(__file__).parents[2] / "drivers/meter/models/template.toml").read_text()
    load_map("template")
    for key in (*MAP_KEYS, *ENTRY_KEYS, *ENTRY_NAMES):
        assert re.search(rf"#.*\b{key}\b", text), f"template.toml does not explain {key}"


def test_load_map_from_a_path(tmp_path: Path) -> None:
    path = write_map(
        tmp_path,
        'model = "Mine"\n[registers]\n'
        'energy_import = { address = 0x48, type = "float32", scale = 1000 }\n',
    )
    register_map = load_map(path)
    assert register_map.model == "Mine"
    assert register_map.function_code == 4
    assert register_map.word_order == "big"
    assert register_map.source == path


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(FatalDriverError, match=r"sdm63O.*sdm630"):
        load_map("sdm63O")


def test_missing_map_file_names_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(FatalDriverError, match=re.escape(path)):
        load_map(path)


GOOD_ENERGY = 'energy_import = { address = 0x48, type = "float32", scale = 1000 }\n'


@pytest.mark.parametrize(
    ("body", "key"),
    [
        pytest.param('model = "X"\n[registers]\n'
                     'voltage_l1 = { address = 0, type = "float32" }\n',
                     "registers.energy_import", id="energy-missing"),
        pytest.param('model = "X"\n[registers]\n'
                     'energy_import = { address = 0, type = "float33" }\n',
                     "registers.energy_import.type", id="bad-type"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'voltage_l1 = { address = 0, type = "float32", scal = 2 }\n',
                     "registers.voltage_l1.scal", id="unknown-entry-key"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'volts = { address = 0, type = "float32" }\n',
                     "registers.volts", id="unknown-quantity"),
        pytest.param('model = "X"\nword_order = "middle"\n[registers]\n' + GOOD_ENERGY,
                     "word_order", id="bad-word-order"),
        pytest.param('model = "X"\nfunction_code = 6\n[registers]\n' + GOOD_ENERGY,
                     "function_code", id="bad-function-code"),
        pytest.param('model = "X"\nmax_registers = 200\n[registers]\n' + GOOD_ENERGY,
                     "max_registers", id="max-registers-over-modbus-limit"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'current_l1 = { address = 70000, type = "float32" }\n',
                     "registers.current_l1.address", id="address-out-of-range"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'current_l1 = { address = 0x49, type = "float32" }\n',
                     "registers.current_l1.address", id="overlapping-registers"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'current_l1 = { address = 0, type = "float32", scale = 0 }\n',
                     "registers.current_l1.scale", id="zero-scale"),
        pytest.param('model = "X"\n[registers]\n' + GOOD_ENERGY
                     + 'current_l1 = { address = 0, type = "uint16", exponent_address = 0x48 }\n',
                     "registers.current_l1.exponent_address", id="exponent-overlaps"),
        pytest.param('[registers]\n' + GOOD_ENERGY, "model", id="model-missing"),
        pytest.param('model = "X"\nbaud = 9600\n[registers]\n' + GOOD_ENERGY,
                     "baud", id="unknown-top-key"),
        pytest.param('model = "X"\n[registers\n', "invalid TOML", id="syntax"),
    ],
)  # fmt: skip
def test_bad_map_file_names_the_file_and_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = write_map(tmp_path, body)
    with pytest.raises(FatalDriverError) as info:
        load_map(path)
    assert path in str(info.value)
    assert key in str(info.value)


def test_an_exact_alias_is_not_an_overlap() -> None:
    sdm120 = load_map("sdm120")
    power_total, power_l1 = sdm120.entry("power_total"), sdm120.entry("power_l1")
    assert power_total is not None
    assert power_l1 is not None
    assert power_total.address == power_l1.address == 0x000C


# --------------------------------------------------------------------------- planning


def covered(register_map: RegisterMap) -> bool:
    reads = plan_reads(register_map)
    for entry in register_map.entries:
        if not any(
            fc == entry.function_code and start <= entry.address
            and entry.address + entry.size <= start + count
            for fc, start, count in reads
        ):  # fmt: skip
            return False
    return True


@pytest.mark.parametrize("name", [*BUNDLED, "template"])
def test_plans_cover_every_register_within_the_limit(name: str) -> None:
    register_map = load_map(name)
    assert covered(register_map)
    assert all(count <= register_map.max_registers for _, _, count in plan_reads(register_map))


def test_sdm630_is_read_in_one_request_and_abb_in_two() -> None:
    # Eastron answers up to 80 registers: voltages (0x0000) to energy (0x0049) is 74.
    assert [tuple(r) for r in plan_reads(load_map("sdm630"))] == [(4, 0x0000, 74)]
    # ABB: the energy counter and the instantaneous values are far apart.
    assert [tuple(r) for r in plan_reads(load_map("abb_b23"))] == [
        (3, 0x5000, 4),
        (3, 0x5B00, 0x2D),
    ]


def test_plan_respects_max_registers_and_max_gap(tmp_path: Path) -> None:
    base = (
        'model = "X"\n{extra}\n[registers]\n'
        'voltage_l1 = {{ address = 0, type = "float32" }}\n'
        'voltage_l2 = {{ address = 2, type = "float32" }}\n'
        'current_l1 = {{ address = 10, type = "float32" }}\n'
        'energy_import = {{ address = 40, type = "float32" }}\n'
    )
    unlimited = load_map(write_map(tmp_path, base.format(extra=""), "a.toml"))
    assert [tuple(r) for r in plan_reads(unlimited)] == [(4, 0, 42)]
    small = load_map(write_map(tmp_path, base.format(extra="max_registers = 12"), "b.toml"))
    assert [tuple(r) for r in plan_reads(small)] == [(4, 0, 12), (4, 40, 2)]
    no_gap = load_map(write_map(tmp_path, base.format(extra="max_gap = 0"), "c.toml"))
    assert [tuple(r) for r in plan_reads(no_gap)] == [(4, 0, 4), (4, 10, 2), (4, 40, 2)]


# --------------------------------------------------------------------------- decoding


def sdm_registers(**values: float) -> list[int]:
    """74 input registers of an Eastron meter from 0x0000, float32 high word first."""
    regs = [0] * 74
    layout = {"v1": 0x00, "v2": 0x02, "v3": 0x04, "i1": 0x06, "i2": 0x08, "i3": 0x0A,
              "p1": 0x0C, "p2": 0x0E, "p3": 0x10, "p": 0x34, "f": 0x46, "kwh": 0x48}  # fmt: skip
    for key, address in layout.items():
        regs[address : address + 2] = words(">f", values.get(key, 0.0))
    return regs


def test_sdm630_energy_in_kwh_is_reported_in_wh() -> None:
    regs = sdm_registers(v1=231.5, v2=229.0, v3=230.25, i1=16.0, i2=15.5, i3=0.0,
                         p1=3704.0, p2=3549.5, p3=0.0, p=7253.5, f=49.98, kwh=1234.5)  # fmt: skip
    reading = decode(load_map("sdm630"), {(4, 0): regs})
    assert reading.energy_wh == pytest.approx(1_234_500.0)
    assert reading.voltage_v == pytest.approx((231.5, 229.0, 230.25))
    assert reading.current_a == pytest.approx((16.0, 15.5, 0.0))
    assert reading.power_phase_w == pytest.approx((3704.0, 3549.5, 0.0))
    assert reading.power_w == pytest.approx(7253.5)
    assert reading.frequency_hz == pytest.approx(49.98)


def test_sdm120_has_one_phase() -> None:
    regs = sdm_registers(v1=230.0, i1=10.0, p1=2300.0, f=50.0, kwh=2.5)
    reading = decode(load_map("sdm120"), {(4, 0): regs})
    assert reading.energy_wh == pytest.approx(2500.0)
    assert reading.voltage_v == (230.0, None, None)
    assert reading.power_w == pytest.approx(2300.0)


def test_abb_uint64_energy_uses_all_64_bits() -> None:
    counter = 5_000_000_123  # 0.01 kWh units, more than 32 bits
    energy = words(">Q", counter)
    block = [0] * 0x2D
    block[0x00:0x02] = words(">I", 2305)  # 230.5 V
    block[0x0C:0x0E] = words(">I", 1650)  # 16.50 A
    block[0x14:0x16] = words(">i", -123456)  # -1234.56 W (export)
    block[0x2C] = 4998  # 49.98 Hz
    reading = decode(load_map("abb_b23"), {(3, 0x5000): energy, (3, 0x5B00): block})
    assert reading.energy_wh == pytest.approx(counter * 10.0)
    assert reading.voltage_v[0] == pytest.approx(230.5)
    assert reading.current_a[0] == pytest.approx(16.5)
    assert reading.power_w == pytest.approx(-1234.56)
    assert reading.frequency_hz == pytest.approx(49.98)


def test_em340_int32_is_low_word_first() -> None:
    block = [0] * 0x36
    block[0x00:0x02] = low_word_first(">i", 2301)  # 230.1 V
    block[0x0C:0x0E] = low_word_first(">i", 16_250)  # 16.250 A
    block[0x28:0x2A] = low_word_first(">i", 112_345)  # 11234.5 W
    block[0x33] = 500  # 50.0 Hz
    block[0x34:0x36] = low_word_first(">i", 123_456)  # 12345.6 kWh
    assert block[0x34:0x36] == [0xE240, 0x0001]
    reading = decode(load_map("em340"), {(4, 0): block})
    assert reading.energy_wh == pytest.approx(12_345_600.0)
    assert reading.voltage_v[0] == pytest.approx(230.1)
    assert reading.current_a[0] == pytest.approx(16.25)
    assert reading.power_w == pytest.approx(11234.5)
    assert reading.frequency_hz == pytest.approx(50.0)


SENTINEL_CASES = [
    ("uint16", [0xFFFF]),
    ("int16", [0x7FFF]),
    ("uint32", [0xFFFF, 0xFFFF]),
    ("int32", [0x7FFF, 0xFFFF]),
    ("uint64", [0xFFFF] * 4),
    ("float32", words(">f", math.nan)),
    ("float32", words(">f", math.inf)),
    ("float32", words(">f", -math.inf)),
]


@pytest.mark.parametrize(("data_type", "raw"), SENTINEL_CASES)
def test_not_available_values_are_none(tmp_path: Path, data_type: str, raw: list[int]) -> None:
    register_map = load_map(
        write_map(
            tmp_path,
            f'model = "X"\n[registers]\n'
            f'voltage_l1 = {{ address = 0, type = "{data_type}" }}\n'
            f'energy_import = {{ address = 8, type = "float32" }}\n',
        )
    )
    block = raw + [0] * (8 - len(raw)) + words(">f", 100.0)
    reading = decode(register_map, {(4, 0): block})
    assert reading.voltage_v == (None, None, None)
    assert reading.energy_wh == 100.0
    # One less than the sentinel is a real number.
    block[len(raw) - 1] -= 1
    if data_type != "float32":
        assert decode(register_map, {(4, 0): block}).voltage_v[0] is not None


@pytest.mark.parametrize(
    "energy",
    [words(">f", math.nan), words(">f", math.inf), words(">f", -1.0)],
    ids=["nan", "inf", "negative"],
)
def test_energy_that_is_not_a_number_is_a_protocol_error(energy: list[int]) -> None:
    regs = sdm_registers(v1=230.0)
    regs[0x48:0x4A] = energy
    with pytest.raises(ProtocolError, match="energy_import"):
        decode(load_map("sdm630"), {(4, 0): regs})


def test_energy_not_read_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="energy_import"):
        decode(load_map("sdm630"), {(4, 0): [0] * 10})


EXPONENT_MAP = """
model = "Iskra-like"
[registers]
energy_import = { address = 10, type = "int32", exponent_address = 4 }
power_total   = { address = 12, type = "int32", scale = 0.1, exponent_address = 5 }
"""


@pytest.mark.parametrize(("exponent", "expected"), [(0, 12345.0), (-1, 1234.5), (3, 12_345_000.0)])
def test_exponent_register_scales_by_a_power_of_ten(
    tmp_path: Path, exponent: int, expected: float
) -> None:
    register_map = load_map(write_map(tmp_path, EXPONENT_MAP))
    block = [0] * 14
    block[4] = words(">h", exponent)[0]
    block[5] = words(">h", 0)[0]
    block[10:12] = words(">i", 12345)
    block[12:14] = words(">i", 500)
    reading = decode(register_map, {(4, 0): block})
    assert reading.energy_wh == pytest.approx(expected)
    assert reading.power_w == pytest.approx(50.0)
    block[4] = 0x7FFF  # exponent not available: the value is not available either
    with pytest.raises(ProtocolError):
        decode(register_map, {(4, 0): block})


def test_encode_picks_an_exponent_that_keeps_the_value(tmp_path: Path) -> None:
    register_map = load_map(write_map(tmp_path, EXPONENT_MAP))
    reading = MeterReading(energy_wh=98_765_432_109.0, power_w=3.25)
    blocks = encode(register_map, reading)
    back = decode(register_map, blocks)
    assert back.energy_wh == pytest.approx(98_765_432_109.0, rel=1e-8)
    assert back.power_w == pytest.approx(3.25)


@pytest.mark.parametrize("name", [*BUNDLED, "template"])
def test_encode_then_decode_gives_the_reading_back(name: str) -> None:
    register_map = load_map(name)
    reading = MeterReading(
        energy_wh=7_654_321.0,
        power_w=11_040.0,
        voltage_v=(230.1, 229.9, 231.0),
        current_a=(16.0, 16.0, 16.0),
        power_phase_w=(3680.0, 3680.0, 3680.0),
        frequency_hz=50.0,
    )
    back = decode(register_map, encode(register_map, reading))
    assert back.energy_wh == pytest.approx(reading.energy_wh, abs=100.0)
    assert back.frequency_hz == pytest.approx(50.0)
    for measured, true in zip(back.voltage_v, reading.voltage_v, strict=True):
        assert measured is None or measured == pytest.approx(true, abs=0.1)


def test_encode_writes_none_as_not_available() -> None:
    register_map = load_map("abb_b23")
    blocks = encode(register_map, MeterReading(energy_wh=10.0))
    assert blocks[(3, 0x5B00)] == [0xFFFF, 0xFFFF]  # uint32 voltage
    assert blocks[(3, 0x5B14)] == [0x7FFF, 0xFFFF]  # int32 power
    assert blocks[(3, 0x5B2C)] == [0xFFFF]  # uint16 frequency
    assert blocks[(3, 0x5000)] == [0, 0, 0, 1]  # 10 Wh = 1 count of 0.01 kWh
