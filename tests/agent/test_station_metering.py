"""What the station reports from its meter, without sockets: a Station on a fake controller,
meter and clock, and a real SQLite store whose queue is read back as the CSMS would get it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.assembly import ChargePoint, assemble
from agent.chargepoint.metering import next_aligned
from agent.chargepoint.model import ConnectorHardware
from agent.chargepoint.station import Station
from agent.config import validate
from agent.core.metering import energy_register_wh
from agent.features.registry import ConfigKeys
from agent.store import Store
from drivers.base import (
    ControlMode,
    DeviceTimeout,
    EvseCapabilities,
    EvseStatus,
    MeterReading,
    VehicleState,
)
from drivers.meter.maps import decode, encode, load_map
from tests.conftest import after_power_cut

START = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = START

    def now(self) -> datetime:
        return self.t


class FakeEvse:
    capabilities = EvseCapabilities()

    def __init__(self) -> None:
        self.mode = ControlMode.PAUSED
        self.current = 16.0

    def set_listener(self, listener: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read_status(self) -> EvseStatus:
        return EvseStatus(vehicle=VehicleState.CHARGING, mode=self.mode,
                          offered_current_a=self.current, contactor_closed=True)  # fmt: skip

    async def enable(self) -> None:
        self.mode = ControlMode.ENABLED

    async def pause(self) -> None:
        self.mode = ControlMode.PAUSED

    async def disable(self) -> None:
        self.mode = ControlMode.DISABLED

    async def set_offered_current(self, amps: float) -> float:
        self.current = amps
        return amps

    async def unlock(self) -> bool:
        return False


class FakeMeter:
    def __init__(self) -> None:
        self.reading = MeterReading(energy_wh=10_000.0, power_w=11_000.0,
                                    current_a=(16.0, 16.0, 16.0), voltage_v=(230.0,) * 3)  # fmt: skip
        self.fail = False

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read(self) -> MeterReading:
        if self.fail:
            raise DeviceTimeout("no answer")
        return self.reading


async def station(tmp_path: Path, **ocpp: object) -> tuple[Station, FakeClock, FakeMeter, Store]:
    st, clock, meter, store, _charger = await charge_point(tmp_path, **ocpp)
    return st, clock, meter, store


async def charge_point(
    tmp_path: Path, **ocpp: object
) -> tuple[Station, FakeClock, FakeMeter, Store, ChargePoint]:
    cfg = validate(
        {
            "csms": {"url": "wss://localhost/ocpp", "charge_point_id": "CP-1",
                     "password": "0123456789abcdef", "response_timeout_s": 5},
            "agent": {"state_dir": str(tmp_path), "free_vend_id_tag": ""},
            "time": {"ntp_servers": []},
            "hardware": {"max_current_a": 32, "nominal_voltage_v": 230, "phases": 3,
                         "meter_poll_s": 3600, "meter_miss_limit": 3, "connectors": 1},
        },
        tmp_path / "evcp.toml",
    )  # fmt: skip
    store = Store.open(tmp_path)
    clock, meter = FakeClock(), FakeMeter()
    charger = assemble(cfg=cfg, store=store, keys=ConfigKeys(overrides=dict(ocpp)), clock=clock,  # type: ignore[arg-type]
                       hardware=[ConnectorHardware(FakeEvse(), meter)],  # type: ignore[arg-type]
                       request_restart=lambda kind: None)  # fmt: skip
    st = charger.station
    st.registered = True
    await charger.start()
    return st, clock, meter, store, charger


def delivered(store: Store, action: str) -> list[dict[str, Any]]:
    out = []
    while (head := store.queue_head()) is not None:
        if head.action == action:
            out.append(head.payload)
        store.queue_done(head.seq)
    return out


async def fail_meter(st: Station, meter: FakeMeter) -> None:
    meter.fail = True
    c = st.connectors[1]
    for _ in range(3):
        await st.read_meter(c)
    assert c.meter_failed


def test_a_float32_kwh_register_gives_the_wh_the_meter_shows() -> None:
    """10.006 kWh in a float32 register is 10005.9996 Wh: meterStart says 10006, not 10005."""
    sdm630 = load_map("sdm630")
    reading = decode(sdm630, encode(sdm630, MeterReading(energy_wh=10_006.0)))
    assert reading.energy_wh != 10_006.0  # float32 cannot hold it exactly
    assert energy_register_wh(reading) == 10_006


async def test_a_triggered_meter_value_from_a_silent_meter_is_its_last_register_as_of_then(
    tmp_path: Path,
) -> None:
    st, clock, meter, _store, charger = await charge_point(tmp_path)
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    read_at = clock.t
    await fail_meter(st, meter)
    clock.t += timedelta(hours=2)
    st.outbox.online = True
    charger.features.remote_trigger.send_triggered("MeterValues", 1)
    (sent,) = list(st.outbox.volatile)
    (value,) = sent.payload["meterValue"]
    assert value["timestamp"].startswith(read_at.strftime("%Y-%m-%dT%H:%M"))
    assert [v.get("measurand") for v in value["sampledValue"]] == ["Energy.Active.Import.Register"]


async def test_the_end_sample_of_a_transaction_whose_meter_went_silent_invents_no_power(
    tmp_path: Path,
) -> None:
    st, clock, meter, store = await station(
        tmp_path, StopTxnSampledData="Energy.Active.Import.Register,Power.Active.Import"
    )
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    await fail_meter(st, meter)
    clock.t += timedelta(hours=2)
    await st.stop_transaction(c, "Local")
    (stop,) = delivered(store, "StopTransaction")
    end = stop["transactionData"][-1]
    assert "Power.Active.Import" not in json.dumps(end)
    assert end["sampledValue"][0]["context"] == "Transaction.End"
    assert not end["timestamp"].startswith(clock.t.strftime("%Y-%m-%dT%H"))  # not "now"


async def test_stop_transaction_data_keeps_every_clock_aligned_value_when_thinned(
    tmp_path: Path,
) -> None:
    """Four hours at 60 s sampling overflow transactionData: periodic samples are thinned,
    the quarter-hour aligned values (time-of-use billing) all stay."""
    st, clock, _meter, store = await station(
        tmp_path, StopTxnAlignedData="Energy.Active.Import.Register",
        ClockAlignedDataInterval=900, MeterValueSampleInterval=60,
    )  # fmt: skip
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    for minute in range(1, 4 * 60 + 1):
        clock.t = START + timedelta(minutes=minute, seconds=7)
        reading = MeterReading(energy_wh=10_000.0 + minute * 100, power_w=6000.0)
        st.metering.keep_for_stop(c, reading, "Sample.Periodic", "StopTxnSampledData")
        if minute % 15 == 0:
            at = START + timedelta(minutes=minute)
            st.metering.keep_for_stop(c, reading, "Sample.Clock", "StopTxnAlignedData", at)
    await st.stop_transaction(c, "Local")
    (stop,) = delivered(store, "StopTransaction")
    contexts = [mv["sampledValue"][0]["context"] for mv in stop["transactionData"]]
    assert contexts.count("Sample.Clock") == 16
    assert 0 < contexts.count("Sample.Periodic") < 240
    assert len(json.dumps(stop["transactionData"])) < 20_000


async def test_a_meter_reset_mid_transaction_does_not_erase_the_energy_delivered(
    tmp_path: Path,
) -> None:
    """meterStart 10,000 Wh; 5 kWh delivered (15,000); the meter is replaced or reset (200)
    and gives 1 kWh more (1,200): meterStop is the 15,000 already read, not meterStart."""
    st, clock, meter, store = await station(tmp_path)
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    for register in (15_000.0, 200.0, 1_200.0):
        clock.t += timedelta(hours=1)
        meter.reading = MeterReading(energy_wh=register)
        await st.read_meter(c)
    await st.stop_transaction(c, "Local")
    (stop,) = delivered(store, "StopTransaction")
    assert stop["meterStop"] == 15_000


async def test_a_register_jump_the_supply_cannot_deliver_is_refused_as_a_misread(
    tmp_path: Path,
) -> None:
    """A corrupted answer (a billion Wh a minute later) never becomes a reading, a
    MeterValue or a bill; the next sound answer is used as usual."""
    st, clock, meter, store = await station(tmp_path, StopTxnSampledData="")
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    clock.t += timedelta(minutes=1)
    meter.reading = MeterReading(energy_wh=1e9)
    assert await st.read_meter(c) is None
    assert c.reading is not None and c.reading.energy_wh == 10_000.0
    clock.t += timedelta(minutes=1)
    meter.reading = MeterReading(energy_wh=10_300.0)  # 18 kW for two minutes: possible
    assert await st.read_meter(c) is not None
    await st.stop_transaction(c, "Local")
    (stop,) = delivered(store, "StopTransaction")
    assert stop["meterStop"] == 10_300


async def test_an_unacknowledged_staged_sample_reaches_the_disk_between_slow_meter_polls(
    tmp_path: Path,
) -> None:
    """Staged (``queue_flush_s``, 0.2 s here), a MeterValues the CSMS has not acknowledged
    is on disk once that time has passed, although no meter poll comes in between (every
    3600 s here): a power cut then does not lose it."""
    st, _clock, meter, store = await station(tmp_path / "state")
    store.stage(tmp_path / "run" / "stage.db", 0.2)
    c = st.connectors[1]
    assert await st.start_transaction(c, "TAG")
    st.metering.queue_meter_values(c, meter.reading, "Sample.Periodic", "MeterValuesSampledData")
    cut = tmp_path / "cut"

    def transaction_messages() -> list[str]:  # (the start's security event aside)
        queued = after_power_cut(tmp_path / "state", cut)
        return [a for a, _ in queued if a != "SecurityEventNotification"]

    assert transaction_messages() == ["StartTransaction"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10  # (the flush is due after 0.2 s: a timer, not a poll)
    while transaction_messages() != ["StartTransaction", "MeterValues"]:
        assert loop.time() < deadline, transaction_messages()
        await asyncio.sleep(0.05)
    store.close()


def test_clock_aligned_instants_start_again_at_every_midnight() -> None:
    """ClockAlignedDataInterval 900: quarter hours. 25,200 s (7 h), which does not divide a
    day: 07:00, 14:00, 21:00, then 00:00 -- not 04:00 the next morning."""
    day = datetime(2024, 5, 1, tzinfo=UTC)
    assert next_aligned(day.replace(hour=10, minute=7), 900) == day.replace(hour=10, minute=15)
    assert next_aligned(day.replace(hour=10, minute=15), 900) == day.replace(hour=10, minute=30)
    assert next_aligned(day.replace(hour=13, minute=59), 25_200) == day.replace(hour=14)
    assert next_aligned(day.replace(hour=21, second=1), 25_200) == day + timedelta(days=1)
