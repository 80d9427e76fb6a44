"""Offline operation, end to end: the CSMS goes away and comes back, the agent charges on.

The CSMS is stopped (``csms.stop()``: the listening socket and the connection close, new
connections are refused) and started again on the same port. Meanwhile the agent keeps
taking MeterValues and starts and stops transactions from the local list, the cache or
AllowOfflineTxForUnknownId; when the CSMS is back, every transaction message is delivered
once, in order, with the timestamps of when it was taken and the CSMS's transactionId.

Also here: the Local Auth List Management and Reservation profiles, a full disk, a corrupt
state file, and a week-long outage (10,080 MeterValues queued through the store).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.v16 import call

from agent.ocpp.csms import Csms, Received
from agent.store import Store
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    server_context,
    status_is,
    write_config,
)

TX_ACTIONS = ("StartTransaction", "MeterValues", "StopTransaction")


# ---------------------------------------------------------------------- helpers
def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def in_s(seconds: float) -> str:
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


def energy(payload: dict[str, Any]) -> int:
    for value in payload["meterValue"][0]["sampledValue"]:
        if value.get("measurand", "Energy.Active.Import.Register") == (
            "Energy.Active.Import.Register"
        ):
            return int(float(value["value"]))
    raise AssertionError(f"no energy register in {payload}")


def taken_at(payload: dict[str, Any]) -> str:
    return str(payload["meterValue"][0]["timestamp"])


def tx_messages(csms: Csms, after: int = 0) -> list[Received]:
    """Transaction messages (MeterValues only with a transactionId) received since ``after``."""
    return [
        r
        for r in csms.received[after:]
        if r.action in TX_ACTIONS and (r.action != "MeterValues" or "transactionId" in r.payload)
    ]


async def wait_action(csms: Csms, action: str, *, timeout_s: float) -> None:
    """Wait for ``action`` scanning each received message once (``wait_message`` scans
    everything received on every message: too slow for ten thousand)."""
    seen = 0

    def arrived() -> bool:
        nonlocal seen
        found = any(r.action == action for r in csms.received[seen:])
        seen = len(csms.received)
        return found

    await csms.wait_for(arrived, timeout_s=timeout_s)


async def plug(agent: RunningAgent, connector: int = 1) -> None:
    """Plug a vehicle in and wait until the agent has seen it."""
    await agent.sim("plug", connector=connector)
    await agent.wait_status(
        lambda s: (
            s["connectors"][connector - 1]["vehicle"] in ("connected", "requesting", "charging")
        )
    )


async def unplug(agent: RunningAgent, connector: int = 1) -> None:
    await agent.sim("unplug", connector=connector)
    await agent.wait_status(lambda s: s["connectors"][connector - 1]["vehicle"] == "absent")


async def wait_booted(csms: Csms, after: int = 0) -> None:
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1, after=after)


async def tx_id_of(agent: RunningAgent, connector: int = 1) -> int:
    status = await agent.wait_status(
        lambda s: s["connectors"][connector - 1]["transaction_id"] is not None
    )
    return int(status["connectors"][connector - 1]["transaction_id"])


async def start_charging(agent: RunningAgent, csms: Csms, tag: str = "TAG-1") -> int:
    mark = len(csms.received)
    await plug(agent)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag=tag, connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    return await tx_id_of(agent)


class Outage:
    """Stop the CSMS and start it again on the same port."""

    def __init__(self, csms: Csms, ca: trustme.CA) -> None:
        self.csms = csms
        self.ca = ca
        self.port = csms.port

    async def begin(self, agent: RunningAgent) -> None:
        self.port = self.csms.port
        await self.csms.stop()
        await agent.wait_status(lambda s: not s["csms"]["connected"])

    async def end(self) -> int:
        """Start the CSMS again; return the index of the first message received after."""
        mark = len(self.csms.received)
        await self.csms.start(server_context(self.ca), port=self.port)
        return mark


@pytest.fixture
def outage(csms: Csms, ca: trustme.CA) -> Outage:
    return Outage(csms, ca)


def check_delivery(
    messages: list[Received], tx_id: int, *, before: str, meter_start: int | None = None
) -> None:
    """One transaction's messages: its id everywhere, taken before ``before``, in order,
    no duplicate, consistent energy, the StopTransaction last."""
    assert messages, "nothing delivered"
    assert all(r.payload["transactionId"] == tx_id for r in messages if r.action != "Start"
               "Transaction")  # fmt: skip
    stop = messages[-1]
    assert stop.action == "StopTransaction"
    meter_values = [r.payload for r in messages if r.action == "MeterValues"]
    stamps = [taken_at(p) for p in meter_values]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    assert all(stamp < before for stamp in stamps), (stamps, before)
    assert stop.payload["timestamp"] < before
    readings = [energy(p) for p in meter_values]
    assert readings == sorted(readings)
    assert all(wh <= stop.payload["meterStop"] for wh in readings)
    if meter_start is not None:
        assert all(wh >= meter_start for wh in readings)


# ---------------------------------------------------------------------- outages
#: The queue's two modes: MeterValues staged in RAM until acknowledged (the default,
#: ``queue_flush_s = 10``), and every message on disk before it is sent (0).
QUEUE_MODES = pytest.mark.parametrize(
    "agent_extra", ["", "queue_flush_s = 0"], ids=["staged", "on-disk"]
)


async def booted_in(make_agent: AgentFactory, csms: Csms, agent_extra: str) -> RunningAgent:
    agent: RunningAgent = await make_agent(agent_extra=agent_extra)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    return agent


@QUEUE_MODES
async def test_outage_while_charging_delivers_everything_in_order(
    make_agent: AgentFactory, csms: Csms, outage: Outage, agent_extra: str
) -> None:
    booted = await booted_in(make_agent, csms, agent_extra)
    tx_id = await start_charging(booted, csms)
    meter_start = csms.messages("StartTransaction")[-1]["meterStart"]
    await outage.begin(booted)
    went_offline = iso(datetime.now(UTC))
    await booted.wait_status(lambda s: s["queue"]["pending"] >= 3)
    assert "stopped" in await booted.swipe("TAG-1")  # a local stop, offline
    status = await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is None)
    queued = status["queue"]["pending"]
    came_back = iso(datetime.now(UTC))
    mark = await outage.end()
    await csms.wait_message("StopTransaction", after=mark, timeout_s=20)
    status = await booted.wait_status(lambda s: s["queue"]["pending"] == 0)
    assert status["queue"] == {"pending": 0, "failed": 0, "dropped": 0}

    delivered = tx_messages(csms, mark)
    assert len(delivered) == queued  # everything queued, once
    check_delivery(delivered, tx_id, before=came_back, meter_start=meter_start)
    assert delivered[-1].payload["reason"] == "Local"
    # Taken while offline, not when sent.
    assert sum(taken_at(r.payload) > went_offline for r in delivered[:-1]) >= 2
    # After the reconnect the current status of every connector is sent again.
    assert {r.payload["connectorId"] for r in csms.received[mark:]
            if r.action == "StatusNotification"} == {0, 1}  # fmt: skip
    assert csms.errors == []


async def test_transaction_started_offline_gets_its_id_at_delivery(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    agent: RunningAgent = await make_agent(ocpp={"AllowOfflineTxForUnknownId": True})
    await wait_booted(csms)
    await outage.begin(agent)
    await plug(agent)
    assert "started" in await agent.swipe("OFFLINE-1")
    status = await agent.wait_status(lambda s: s["queue"]["pending"] >= 3)
    assert status["connectors"][0]["status"] == "Charging"
    assert status["connectors"][0]["transaction_id"] is None  # unknown until answered
    came_back = iso(datetime.now(UTC))
    mark = await outage.end()
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "OFFLINE-1"
    assert start.payload["timestamp"] < came_back
    tx_id = await tx_id_of(agent)
    assert "stopped" in await agent.swipe("OFFLINE-1")
    await csms.wait_message("StopTransaction", after=mark)
    delivered = tx_messages(csms, mark)
    assert delivered[0] is start
    check_delivery(delivered[1:], tx_id, before=iso(datetime.now(UTC)),
                   meter_start=start.payload["meterStart"])  # fmt: skip
    assert sum(taken_at(r.payload) < came_back for r in delivered[1:-1]) >= 2
    assert csms.errors == []


async def start_offline_for_a_tag_the_csms_refuses(
    make_agent: AgentFactory, csms: Csms, outage: Outage, ocpp: dict[str, Any], **agent: Any
) -> tuple[RunningAgent, int]:
    """An unknown tag starts charging during an outage; when the link is back the CSMS
    answers the StartTransaction with Invalid. Returns the agent and the mark of the
    outage's end."""
    csms.accepted_tags = {"SOMEONE-ELSE"}
    running: RunningAgent = await make_agent(
        ocpp={"AllowOfflineTxForUnknownId": True, **ocpp}, **agent
    )
    await wait_booted(csms)
    await outage.begin(running)
    await plug(running)
    assert "started" in await running.swipe("STRANGER")
    await running.wait_status(lambda s: s["connectors"][0]["status"] == "Charging")
    mark = await outage.end()
    await csms.wait_message("StartTransaction", after=mark)
    return running, mark


@pytest.mark.parametrize("stop_on_invalid", [True, False])
async def test_offline_start_refused_afterwards(
    make_agent: AgentFactory, csms: Csms, outage: Outage, stop_on_invalid: bool
) -> None:
    agent, mark = await start_offline_for_a_tag_the_csms_refuses(
        make_agent, csms, outage, ocpp={"StopTransactionOnInvalidId": stop_on_invalid}
    )
    start = await csms.wait_message("StartTransaction", after=mark)
    tx_id = await tx_id_of(agent) if not stop_on_invalid else None
    if stop_on_invalid:
        stop = await csms.wait_message("StopTransaction", after=mark)
        assert stop.payload["reason"] == "DeAuthorized"
        assert stop.payload["meterStop"] >= start.payload["meterStart"]
        await csms.wait_message("StatusNotification", status_is(1, "Finishing"), after=mark)
    else:
        # Suspended: the contactor opens, the transaction stays until it is stopped.
        await csms.wait_message("StatusNotification", status_is(1, "SuspendedEVSE"), after=mark)
        sim = (await agent.sim("state"))["connectors"][0]
        assert not sim["contactor_closed"]
        assert (await agent.status())["connectors"][0]["transaction_id"] == tx_id
        assert "stopped" in await agent.swipe("STRANGER")
        stop = await csms.wait_message("StopTransaction", after=mark)
        assert stop.payload["reason"] == "Local"
        assert csms.errors == []
        return
    # The refusal is cached: the same tag is refused offline from now on.
    await outage.begin(agent)
    await unplug(agent)
    await plug(agent)
    assert "rejected (Invalid)" in await agent.swipe("STRANGER")
    assert csms.errors == []


async def test_refused_after_offline_start_charges_on_up_to_max_energy_on_invalid_id(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    """StopTransactionOnInvalidId false and MaxEnergyOnInvalidId set: after the CSMS
    refuses the idTag the car still gets that much energy, then energy stops
    (SuspendedEVSE) and the transaction stays open."""
    allowance_wh = 5000
    # time_scale 360: 22 kW gives about 1.1 kWh per 0.5 s meter poll.
    agent, mark = await start_offline_for_a_tag_the_csms_refuses(
        make_agent, csms, outage, time_scale=360,
        ocpp={"StopTransactionOnInvalidId": False, "MaxEnergyOnInvalidId": allowance_wh},
    )  # fmt: skip
    refused_at_wh = (await agent.sim("state"))["connectors"][0]["energy_wh"]
    await csms.wait_message("StatusNotification", status_is(1, "SuspendedEVSE"), after=mark)
    sim = (await agent.sim("state"))["connectors"][0]
    assert not sim["contactor_closed"]
    delivered_wh = sim["energy_wh"] - refused_at_wh
    per_poll_wh = 1300  # a reading may be one poll old at either end
    assert allowance_wh - per_poll_wh <= delivered_wh <= allowance_wh + 2 * per_poll_wh
    status = (await agent.status())["connectors"][0]
    assert status["transaction_id"] is not None
    assert csms.errors == []


async def test_energy_allowed_on_an_invalid_id_stops_when_the_meter_is_lost(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    """Energy allowed after a refusal is metered energy: without a meter it stops."""
    agent, mark = await start_offline_for_a_tag_the_csms_refuses(
        make_agent, csms, outage, time_scale=36,
        ocpp={"StopTransactionOnInvalidId": False, "MaxEnergyOnInvalidId": 10_000_000},
    )  # fmt: skip
    await asyncio.sleep(1.2)  # refused, charging on within the allowance
    assert (await agent.sim("state"))["connectors"][0]["contactor_closed"]
    await agent.sim("meter-silent")
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"), after=mark)
    assert (await agent.status())["connectors"][0]["transaction_id"] is not None
    async with asyncio.timeout(10):
        while (await agent.sim("state"))["connectors"][0]["contactor_closed"]:
            await asyncio.sleep(0.1)
    assert csms.errors == []


@QUEUE_MODES
async def test_connection_drop_between_call_and_result_resends_the_same_message(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch, agent_extra: str
) -> None:
    """What a CSMS sees when the connection drops after it received a transaction
    message and before its CALLRESULT reached the charger: the message again, as the
    first transaction message after the reconnect, with identical content (timestamps
    included) -- the charger cannot know it arrived. A CSMS recognises the duplicate by its
    content; for a StartTransaction it should answer with the transactionId it already
    gave (this test CSMS does not: it gives a new one, and the agent uses that one)."""
    booted = await booted_in(make_agent, csms, agent_extra)
    from agent.ocpp.csms import _CsmsChargePoint

    drop: dict[str, Any] = {"action": None, "last": None}
    csms.listener = lambda item: drop.__setitem__("last", item.action)
    original = _CsmsChargePoint._send

    async def send(self: Any, message: str) -> None:
        armed = drop["action"] is not None and drop["last"] == drop["action"]
        if armed and message.startswith("[3,"):
            drop["action"] = None
            await self._connection.close()  # the result never leaves
            return
        await original(self, message)

    monkeypatch.setattr(_CsmsChargePoint, "_send", send)

    # A StartTransaction whose result is lost.
    drop["action"] = "StartTransaction"
    mark = len(csms.received)
    await plug(booted)
    assert "started" in await booted.swipe("DUP-1")
    await csms.wait_for(lambda: len(csms.messages("StartTransaction")) >= 2)
    tx_id = await tx_id_of(booted)
    # A MeterValues whose result is lost.
    await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id, after=mark)
    drop["action"] = "MeterValues"
    await csms.wait_for(lambda: drop["action"] is None)
    await asyncio.sleep(1.5)
    assert "stopped" in await booted.swipe("DUP-1")
    await csms.wait_message("StopTransaction", after=mark)

    delivered = tx_messages(csms, mark)
    starts = [r for r in delivered if r.action == "StartTransaction"]
    assert len(starts) == 2 and starts[0].payload == starts[1].payload
    assert delivered[0] is starts[0] and delivered[1] is starts[1]
    rest = delivered[2:]
    # Every later message carries the id of the answer the agent received.
    assert {r.payload["transactionId"] for r in rest} == {tx_id}
    payloads = [r.payload for r in rest]
    duplicates = [i for i in range(1, len(payloads)) if payloads[i] == payloads[i - 1]]
    assert len(duplicates) == 1, payloads
    assert rest[duplicates[0]].action == "MeterValues"
    # No other message came twice.
    unique = [p for i, p in enumerate(payloads) if i not in duplicates]
    assert len({str(p) for p in unique}) == len(unique)
    assert csms.errors == []


async def test_week_long_outage_is_delivered_in_order(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    """A week offline at 60 s sampling: 10,080 MeterValues (queued through the store, as
    the agent queues them), then everything is delivered once, in order, with its own
    timestamp and the transactionId the CSMS gave."""
    samples = 10_080
    directory = tmp_path / "week"
    directory.mkdir()
    config = write_config(directory, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file,
                          ocpp={"MeterValueSampleInterval": 60})  # fmt: skip
    store = Store.open(directory / "state")
    begin = datetime.now(UTC) - timedelta(days=7, minutes=2)
    local = store.begin_transaction(
        connector_id=1, id_tag="WEEK", meter_start_wh=1000, start_ts=iso(begin),
        reservation_id=None,
        start_payload={"connectorId": 1, "idTag": "WEEK", "meterStart": 1000,
                       "timestamp": iso(begin)},
    )  # fmt: skip
    for n in range(1, samples + 1):
        value = {"value": str(1000 + n * 100), "context": "Sample.Periodic",
                 "measurand": "Energy.Active.Import.Register", "unit": "Wh"}  # fmt: skip
        at = iso(begin + timedelta(minutes=n))
        store.enqueue("MeterValues", {"connectorId": 1, "transactionId": 0,
                                      "meterValue": [{"timestamp": at,
                                                      "sampledValue": [value]}]}, local)  # fmt: skip
    end = iso(begin + timedelta(minutes=samples + 1))
    stop_wh = 1000 + samples * 100
    store.end_transaction(local, meter_stop_wh=stop_wh, stop_ts=end, reason="Local",
                          stop_payload={"transactionId": 0, "meterStop": stop_wh,
                                        "timestamp": end, "reason": "Local"})  # fmt: skip
    store.close()

    agent = RunningAgent(config)
    await agent.start()
    try:
        await wait_action(csms, "StopTransaction", timeout_s=240)
        status = await agent.wait_status(lambda s: s["queue"]["pending"] == 0)
    finally:
        await agent.stop()
    assert status["queue"] == {"pending": 0, "failed": 0, "dropped": 0}
    delivered = tx_messages(csms)
    assert len(delivered) == samples + 2
    assert delivered[0].action == "StartTransaction"
    tx_id = 1001
    assert [taken_at(r.payload) for r in delivered[1:-1]] == [
        iso(begin + timedelta(minutes=n)) for n in range(1, samples + 1)
    ]
    check_delivery(delivered[1:], tx_id, before=iso(datetime.now(UTC)), meter_start=1000)
    assert csms.errors == []


# ---------------------------------------------------------------------- storage trouble
@pytest.fixture
def opened_stores(monkeypatch: pytest.MonkeyPatch) -> list[Store]:
    """Every Store the agent opens (to reach into the running agent's database)."""
    stores: list[Store] = []
    original = Store.open.__func__  # type: ignore[attr-defined]

    def capture(cls: type[Store], state_dir: Path) -> Store:
        store: Store = original(cls, state_dir)
        stores.append(store)
        return store

    monkeypatch.setattr(Store, "open", classmethod(capture))
    return stores


@QUEUE_MODES
async def test_full_disk_keeps_charging_and_reporting(
    make_agent: AgentFactory,
    csms: Csms,
    outage: Outage,
    opened_stores: list[Store],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    agent_extra: str,
) -> None:
    """SQLite's 'database or disk is full' on a write: one clear log line, the agent
    carries on in memory (charging, queueing, reporting), and writes everything back
    once the disk has room again."""
    monkeypatch.setattr(Store, "disk_retry_s", 0.5)
    agent: RunningAgent = await make_agent(agent_extra=agent_extra)
    await wait_booted(csms)
    store = opened_stores[-1]
    tx_id = await start_charging(agent, csms)
    await outage.begin(agent)
    # The disk is full: no page more.
    pages = store._disk.execute("PRAGMA page_count").fetchone()[0]
    store._disk.execute(f"PRAGMA max_page_count={pages}")
    status = await agent.wait_status(lambda s: s["storage"]["error"] is not None, timeout_s=20)
    assert "full" in status["storage"]["error"]
    assert not status["storage"]["on_disk"]
    assert "cannot write the state file" in caplog.text
    pending = status["queue"]["pending"]
    await agent.wait_status(lambda s: s["queue"]["pending"] >= pending + 2)
    status = await agent.status()
    assert status["connectors"][0]["status"] == "Charging"
    assert (await agent.sim("state"))["connectors"][0]["contactor_closed"]
    # Room again: the state goes back to disk at the next write.
    store._disk.execute("PRAGMA max_page_count=1073741823")
    await agent.wait_status(lambda s: s["storage"]["on_disk"], timeout_s=10)
    came_back = iso(datetime.now(UTC))
    mark = await outage.end()
    await agent.wait_status(lambda s: s["queue"]["pending"] == 0, timeout_s=20)
    assert "stopped" in await agent.swipe("TAG-1")
    await csms.wait_message("StopTransaction", after=mark)
    delivered = tx_messages(csms, mark)
    check_delivery(delivered, tx_id, before=iso(datetime.now(UTC)))
    # ``pending`` counted every queued message: the transaction's, and the security event
    # the full disk raised (MemoryExhaustion), also queued durably and delivered since.
    events = [r for r in csms.received[mark:] if r.action == "SecurityEventNotification"]
    assert [r.payload["type"] for r in events] == ["MemoryExhaustion"]
    assert sum(taken_at(r.payload) < came_back for r in delivered[:-1]) >= pending + 2 - 1
    assert csms.errors == []


async def test_corrupt_state_file_is_moved_aside(
    tmp_path: Path, csms: Csms, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "corrupt"
    (directory / "state").mkdir(parents=True)
    garbage = b"not a database, whatever it was" * 64
    (directory / "state" / "evcp.db").write_bytes(garbage)
    config = write_config(directory, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    agent = RunningAgent(config)
    await agent.start()
    try:
        await wait_booted(csms)
        tx_id = await start_charging(agent, csms)
        assert tx_id > 0
    finally:
        await agent.stop()
    aside = list((directory / "state").glob("evcp.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert "moved aside" in caplog.text


# ---------------------------------------------------------------------- authorization
def auth_entry(tag: str, status: str = "Accepted", **info: Any) -> dict[str, Any]:
    return {"idTag": tag, "idTagInfo": {"status": status, **info}}


async def test_local_list_management_and_offline_use(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    agent: RunningAgent = await make_agent(
        ocpp={"SendLocalListMaxLength": 3, "LocalAuthListMaxLength": 4}
    )
    await wait_booted(csms)

    async def send_list(version: int, kind: str, items: list[dict[str, Any]]) -> str:
        result = await csms.call(CP_ID, call.SendLocalList(
            list_version=version, update_type=kind, local_authorization_list=items))  # fmt: skip
        return str(result["status"])

    async def version() -> int:
        return int((await csms.call(CP_ID, call.GetLocalListVersion()))["listVersion"])

    assert await version() == 0
    full = [auth_entry("LIST-OK"), auth_entry("LIST-BLOCKED", "Blocked")]
    assert await send_list(1, "Full", full) == "Accepted"
    assert await version() == 1
    assert await send_list(1, "Differential", [auth_entry("X")]) == "VersionMismatch"
    too_many = [auth_entry(f"T{n}") for n in range(4)]
    assert await send_list(2, "Full", too_many) == "Failed"  # > SendLocalListMaxLength
    too_long = [auth_entry(f"T{n}") for n in range(3)]
    assert await send_list(2, "Differential", too_long) == "Failed"  # > LocalAuthListMaxLength
    assert await send_list(2, "Differential", [auth_entry("LIST-NEW")]) == "Accepted"
    assert await version() == 2
    shown = await csms.call(CP_ID, call.GetConfiguration(key=[
        "LocalAuthListEnabled", "LocalAuthListMaxLength", "SendLocalListMaxLength",
        "SupportedFeatureProfiles"]))  # fmt: skip
    values = {e["key"]: e["value"] for e in shown["configurationKey"]}
    assert values["LocalAuthListEnabled"] == "true"
    assert values["LocalAuthListMaxLength"] == "4"
    assert {"LocalAuthListManagement", "Reservation"} <= set(
        values["SupportedFeatureProfiles"].split(",")
    )

    # The list survives a restart.
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    await wait_booted(csms, after=mark)
    assert await version() == 2

    # Offline, the list decides.
    await outage.begin(agent)
    await plug(agent)
    assert "rejected (Blocked)" in await agent.swipe("LIST-BLOCKED")
    assert "started" in await agent.swipe("list-ok")  # idTags are case-insensitive
    await agent.wait_status(lambda s: s["queue"]["pending"] >= 2)
    mark = await outage.end()
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "list-ok"
    assert not [r for r in csms.received if r.action == "Authorize"]
    assert csms.errors == []


async def test_an_empty_local_list_reports_version_zero(booted: RunningAgent, csms: Csms) -> None:
    """OCPP 1.6 5.10: GetLocalListVersion answers 0 for an empty list, whatever version the
    Full update that emptied it carried (so the CSMS knows to send a full list)."""
    entry = {"idTag": "LIST-1", "idTagInfo": {"status": "Accepted"}}
    full = call.SendLocalList(list_version=4, update_type="Full", local_authorization_list=[entry])
    assert (await csms.call(CP_ID, full))["status"] == "Accepted"
    assert (await csms.call(CP_ID, call.GetLocalListVersion()))["listVersion"] == 4
    empty = call.SendLocalList(list_version=5, update_type="Full", local_authorization_list=[])
    assert (await csms.call(CP_ID, empty))["status"] == "Accepted"
    assert (await csms.call(CP_ID, call.GetLocalListVersion()))["listVersion"] == 0


async def test_a_card_of_the_same_group_stops_the_transaction(
    booted: RunningAgent, csms: Csms
) -> None:
    """Two cards with the same parentIdTag (a fleet): either stops what the other started
    (OCPP 1.6 3.5, OCTT TC_069); a card of another group does not."""
    cards = [
        {"idTag": "CARD-A", "idTagInfo": {"status": "Accepted", "parentIdTag": "FLEET"}},
        {"idTag": "CARD-B", "idTagInfo": {"status": "Accepted", "parentIdTag": "FLEET"}},
        {"idTag": "CARD-C", "idTagInfo": {"status": "Accepted", "parentIdTag": "OTHER"}},
        {"idTag": "CARD-X", "idTagInfo": {"status": "Blocked", "parentIdTag": "FLEET"}},
    ]
    full = call.SendLocalList(list_version=1, update_type="Full", local_authorization_list=cards)
    assert (await csms.call(CP_ID, full))["status"] == "Accepted"
    pre = call.ChangeConfiguration(key="LocalPreAuthorize", value="true")  # the list decides
    assert (await csms.call(CP_ID, pre))["status"] == "Accepted"
    await plug(booted)
    assert "started" in await booted.swipe("CARD-A")
    tx_id = await tx_id_of(booted)
    mark = len(csms.received)
    assert "stopped" not in await booted.swipe("CARD-C")
    assert "stopped" not in await booted.swipe("CARD-X")  # blocked, though of the fleet
    assert "stopped" in await booted.swipe("CARD-B")
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["transactionId"] == tx_id
    assert (stop.payload["idTag"], stop.payload["reason"]) == ("CARD-B", "Local")


async def test_local_pre_authorize_and_list_disabled(booted: RunningAgent, csms: Csms) -> None:
    result = await csms.call(CP_ID, call.SendLocalList(
        list_version=1, update_type="Full",
        local_authorization_list=[auth_entry("PRE-OK")]))  # fmt: skip
    assert result["status"] == "Accepted"
    for key, value in (("LocalPreAuthorize", "true"),):
        assert (await csms.call(CP_ID, call.ChangeConfiguration(key=key, value=value)))[
            "status"
        ] == "Accepted"
    await plug(booted)
    mark = len(csms.received)
    assert "started" in await booted.swipe("PRE-OK")
    await csms.wait_message("StartTransaction", after=mark)
    assert "Authorize" not in [r.action for r in csms.received[mark:]]
    assert "stopped" in await booted.swipe("PRE-OK")
    await csms.wait_message("StopTransaction", after=mark)
    # Its answer handled while the list decides for PRE-OK (so it is not cached): then,
    # with the list disabled, the CSMS is asked again.
    await booted.wait_status(lambda s: s["queue"]["pending"] == 0)
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="LocalAuthListEnabled", value="false")
    )
    assert result["status"] == "Accepted"
    mark = len(csms.received)
    assert "started" in await booted.swipe("PRE-OK")
    auth = await csms.wait_message("Authorize", after=mark)
    start = await csms.wait_message("StartTransaction", after=mark)
    assert auth.payload["idTag"] == "PRE-OK"
    assert csms.received.index(auth) < csms.received.index(start)
    assert csms.errors == []


async def test_cache_and_unknown_tags_offline(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    csms.accepted_tags = {"CACHED"}
    agent: RunningAgent = await make_agent(ocpp={"ConnectionTimeOut": 1})
    await wait_booted(csms)
    # Online: the CSMS answers, and the answers are cached.
    assert "authorized" in await agent.swipe("CACHED")
    assert "rejected (Invalid)" in await agent.swipe("REFUSED")
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Available")
    await outage.begin(agent)
    await plug(agent)
    assert "rejected (Invalid)" in await agent.swipe("REFUSED")  # from the cache
    assert "rejected (Invalid)" in await agent.swipe("UNKNOWN")  # AllowOfflineTxForUnknownId
    assert "started" in await agent.swipe("CACHED")  # LocalAuthorizeOffline
    mark = await outage.end()
    await csms.wait_message("StartTransaction", after=mark)
    assert "stopped" in await agent.swipe("CACHED")
    await csms.wait_message("StopTransaction", after=mark)
    # ClearCache: REFUSED is unknown now, and unknown tags may charge when allowed.
    result = await csms.call(
        CP_ID, call.ChangeConfiguration(key="AllowOfflineTxForUnknownId", value="true")
    )
    assert result["status"] == "Accepted"
    assert (await csms.call(CP_ID, call.ClearCache()))["status"] == "Accepted"
    await outage.begin(agent)
    await unplug(agent)
    await plug(agent)
    assert "started" in await agent.swipe("REFUSED")
    assert csms.errors == []


# ---------------------------------------------------------------------- reservations
async def reserve(
    csms: Csms, connector: int, tag: str, reservation: int, *, seconds: float = 60,
    parent: str | None = None,
) -> str:  # fmt: skip
    result = await csms.call(CP_ID, call.ReserveNow(
        connector_id=connector, expiry_date=in_s(seconds), id_tag=tag,
        reservation_id=reservation, parent_id_tag=parent))  # fmt: skip
    return str(result["status"])


async def test_reservation_holds_the_connector_for_its_tag(
    booted: RunningAgent, csms: Csms
) -> None:
    mark = len(csms.received)
    assert await reserve(csms, 1, "RES-TAG", 7) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Reserved"), after=mark)
    assert (await booted.status())["reservations"][0]["reservation_id"] == 7
    assert "reserved" in await booted.swipe("OTHER")
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="OTHER", connector_id=1))
    assert result["status"] == "Rejected"
    assert await reserve(csms, 1, "SOMEONE", 8) == "Occupied"  # reserved already
    await plug(booted)
    assert "reserved" in await booted.swipe("OTHER")
    assert "started" in await booted.swipe("res-tag")
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["reservationId"] == 7
    assert (await booted.status())["reservations"] == []
    assert (await csms.call(CP_ID, call.CancelReservation(reservation_id=7)))["status"] == (
        "Rejected"
    )
    assert csms.errors == []


async def test_reservation_refusals(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(ocpp={"ReserveConnectorZeroSupported": False})
    await wait_booted(csms)
    assert await reserve(csms, 2, "T", 1) == "Rejected"  # no such connector
    assert await reserve(csms, 0, "T", 1) == "Rejected"  # connector 0 not supported
    assert await reserve(csms, 1, "T", 1, seconds=-5) == "Rejected"  # expired already
    # Unavailable
    await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert await reserve(csms, 1, "T", 1) == "Unavailable"
    await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Operative"))
    # Faulted
    mark = len(csms.received)
    await agent.sim("fault", code="GroundFailure")
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"), after=mark)
    assert await reserve(csms, 1, "T", 1) == "Faulted"
    await agent.sim("clear-fault")
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Available")
    # Occupied: a vehicle is plugged in
    await plug(agent)
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Preparing")
    assert await reserve(csms, 1, "T", 1) == "Occupied"
    await unplug(agent)
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Available")
    # A reservation with a known id is replaced.
    assert await reserve(csms, 1, "FIRST", 5) == "Accepted"
    assert await reserve(csms, 1, "SECOND", 5) == "Accepted"
    await plug(agent)
    assert "reserved" in await agent.swipe("FIRST")
    assert "started" in await agent.swipe("SECOND")
    assert csms.errors == []


async def test_reservation_expires_and_is_cancelled(booted: RunningAgent, csms: Csms) -> None:
    mark = len(csms.received)
    assert await reserve(csms, 1, "SHORT", 1, seconds=1.5) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Reserved"), after=mark)
    mark = len(csms.received)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert (await booted.status())["reservations"] == []
    mark = len(csms.received)
    assert await reserve(csms, 1, "LONG", 2) == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Reserved"), after=mark)
    assert (await csms.call(CP_ID, call.CancelReservation(reservation_id=2)))["status"] == (
        "Accepted"
    )
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    assert (await csms.call(CP_ID, call.CancelReservation(reservation_id=2)))["status"] == (
        "Rejected"
    )
    assert csms.errors == []


async def test_reservation_by_parent_id_tag_survives_a_restart(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent(ocpp={"LocalPreAuthorize": True})
    await wait_booted(csms)
    result = await csms.call(CP_ID, call.SendLocalList(
        list_version=1, update_type="Full",
        local_authorization_list=[auth_entry("MEMBER", parentIdTag="FLEET"),
                                  auth_entry("OUTSIDER")]))  # fmt: skip
    assert result["status"] == "Accepted"
    assert await reserve(csms, 1, "FLEET-CARD", 3, parent="FLEET") == "Accepted"
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    await csms.wait_message("StatusNotification", status_is(1, "Reserved"), after=mark)
    await plug(agent)
    assert "reserved" in await agent.swipe("OUTSIDER")
    assert "started" in await agent.swipe("MEMBER")
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["reservationId"] == 3
    assert csms.errors == []


async def test_reservation_of_connector_zero(make_agent: AgentFactory, csms: Csms) -> None:
    agent: RunningAgent = await make_agent(connectors=2)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 2)
    mark = len(csms.received)
    assert await reserve(csms, 0, "ANY-ONE", 9) == "Accepted"
    # Two connectors free for one reservation: both stay Available.
    await plug(agent, 1)
    assert "started" in await agent.swipe("OTHER", connector=1)
    # Now the last free connector is held for the reservation.
    await csms.wait_message("StatusNotification", status_is(2, "Reserved"), after=mark)
    await plug(agent, 2)
    assert "reserved" in await agent.swipe("OTHER-2", connector=2)
    assert "started" in await agent.swipe("ANY-ONE", connector=2)
    await csms.wait_for(lambda: len(csms.messages("StartTransaction")) >= 2)
    starts = csms.messages("StartTransaction")
    assert "reservationId" not in starts[0] and starts[1]["reservationId"] == 9
    statuses = [r.payload["status"] for r in csms.received[mark:]
                if r.action == "StatusNotification" and r.payload["connectorId"] == 1]  # fmt: skip
    assert "Reserved" not in statuses
    assert csms.errors == []
