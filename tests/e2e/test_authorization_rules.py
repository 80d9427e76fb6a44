"""Who may charge, end to end: the offline authorization keys, idTag groups (parentIdTag)
and the reservation rules where they meet (OCPP 1.6 sections 3.5, 5.13, 5.15)."""

from __future__ import annotations

import asyncio
from typing import Any

from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, AgentFactory, RunningAgent
from tests.e2e.test_offline import Outage, outage, plug, reserve, unplug, wait_booted

__all__ = ["outage"]  # a fixture, used by name


async def send_list(csms: Csms, version: int, entries: list[dict[str, object]]) -> str:
    result = await csms.call(CP_ID, call.SendLocalList(
        list_version=version, update_type="Full", local_authorization_list=entries))  # fmt: skip
    return str(result["status"])


async def test_pre_authorize_does_not_override_local_authorize_offline(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    """LocalPreAuthorize saves the round trip while online; offline, LocalAuthorizeOffline
    alone decides. An operator who turned it off (so that revoked cards cannot charge in an
    outage) must not see listed cards charge anyway."""
    agent = await make_agent(ocpp={"LocalPreAuthorize": True, "LocalAuthorizeOffline": False})
    await wait_booted(csms)
    listed = [{"idTag": "LISTED", "idTagInfo": {"status": "Accepted"}}]
    assert await send_list(csms, 1, listed) == "Accepted"
    await plug(agent)
    await outage.begin(agent)
    assert "rejected" in await agent.swipe("LISTED")
    assert (await agent.status())["connectors"][0]["transaction_id"] is None


async def test_local_pre_authorize_still_starts_a_listed_card_at_once_online(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent = await make_agent(ocpp={"LocalPreAuthorize": True, "LocalAuthorizeOffline": False})
    await wait_booted(csms)
    listed = [{"idTag": "LISTED", "idTagInfo": {"status": "Accepted"}}]
    assert await send_list(csms, 1, listed) == "Accepted"
    await plug(agent)
    mark = len(csms.received)
    assert "started" in await agent.swipe("LISTED")
    await csms.wait_message("StartTransaction", after=mark)
    assert "Authorize" not in [r.action for r in csms.received[mark:]]


async def test_a_connector_with_a_car_plugged_in_is_occupied_also_through_connector_zero(
    booted: RunningAgent, csms: Csms
) -> None:
    """The same connector gets the same answer whether the CSMS names it or asks for any
    connector (0): a reservation must not take it from the driver standing there."""
    await plug(booted)
    assert await reserve(csms, 1, "R", 1) == "Occupied"
    assert await reserve(csms, 0, "R", 2) == "Occupied"
    assert "started" in await booted.swipe("DRIVER")


async def test_a_remote_start_for_a_group_reservation_asks_the_csms_for_the_parent(
    booted: RunningAgent, csms: Csms
) -> None:
    """A member of the group a connector is reserved for, unknown to the charger, starts
    by app: the charger learns the member's parentIdTag with an Authorize.req (5.13), even
    with AuthorizeRemoteTxRequests off, and the transaction uses the reservation."""
    csms.parents = {"MEMBER": "FLEET"}
    assert await reserve(csms, 1, "FLEET-CARD", 3, parent="FLEET") == "Accepted"
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="MEMBER", connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("Authorize", lambda p: p["idTag"] == "MEMBER", after=mark)
    await plug(booted)
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "MEMBER" and start.payload["reservationId"] == 3


async def test_a_remote_start_for_someone_outside_the_group_does_not_take_the_reservation(
    booted: RunningAgent, csms: Csms
) -> None:
    csms.parents = {"OUTSIDER": "OTHER-FLEET"}
    assert await reserve(csms, 1, "FLEET-CARD", 3, parent="FLEET") == "Accepted"
    mark = len(csms.received)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="OUTSIDER", connector_id=1))
    assert result["status"] == "Accepted"  # answered before the parent is known
    await csms.wait_message("Authorize", lambda p: p["idTag"] == "OUTSIDER", after=mark)
    await plug(booted)
    assert "started" in await booted.swipe("FLEET-CARD")  # still held for its holder
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "FLEET-CARD" and start.payload["reservationId"] == 3


async def test_a_card_of_the_same_group_stops_a_remote_started_transaction(
    booted: RunningAgent, csms: Csms
) -> None:
    """The group of a transaction started without an Authorize.req comes from the
    StartTransaction answer: another card of the group stops it (3.5, TC_069)."""
    csms.parents = {"CARD-A": "FLEET", "CARD-B": "FLEET"}
    await plug(booted)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="CARD-A", connector_id=1))
    assert result["status"] == "Accepted"
    await booted.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    assert "same group" in await booted.swipe("CARD-B")
    stop = await csms.wait_message("StopTransaction")
    assert stop.payload["reason"] == "Local"


async def test_a_card_of_the_same_group_stops_a_transaction_started_offline_by_an_unknown_card(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    """Started offline by a card nobody knew (AllowOfflineTxForUnknownId): its group is
    learnt from the StartTransaction answer once delivered, and another card of the group
    then stops it."""
    agent = await make_agent(ocpp={"AllowOfflineTxForUnknownId": True})
    await wait_booted(csms)
    csms.parents = {"NEW-CARD": "FLEET", "CARD-B": "FLEET"}
    await plug(agent)
    await outage.begin(agent)
    assert "started" in await agent.swipe("NEW-CARD")
    mark = await outage.end()
    await csms.wait_message("StartTransaction", after=mark)
    await agent.wait_status(lambda s: s["csms"]["connected"] and s["queue"]["pending"] == 0)
    assert "same group" in await agent.swipe("CARD-B")


async def test_a_full_local_list_with_an_entry_without_id_tag_info_fails_and_changes_nothing(
    booted: RunningAgent, csms: Csms
) -> None:
    assert await send_list(csms, 4, [{"idTag": "A", "idTagInfo": {"status": "Accepted"}}]) == (
        "Accepted"
    )
    items = [{"idTag": "B", "idTagInfo": {"status": "Accepted"}}, {"idTag": "C"}]
    assert await send_list(csms, 5, items) == "Failed"
    assert (await csms.call(CP_ID, call.GetLocalListVersion()))["listVersion"] == 4


async def test_cards_on_a_disabled_local_list_are_cached_like_any_other(
    make_agent: AgentFactory, csms: Csms, outage: Outage
) -> None:
    """With the list turned off, the cache is what the charger knows offline: a card that
    happens to be on the old list is cached too, and charges in an outage."""
    agent = await make_agent()
    await wait_booted(csms)
    old = [{"idTag": "OLD", "idTagInfo": {"status": "Accepted"}}]
    assert await send_list(csms, 1, old) == "Accepted"
    changed = await csms.call(
        CP_ID, call.ChangeConfiguration(key="LocalAuthListEnabled", value="false")
    )
    assert changed["status"] == "Accepted"
    await plug(agent)
    assert "started" in await agent.swipe("OLD")  # online: Authorize.req, answer cached
    assert "stopped" in await agent.swipe("OLD")
    await unplug(agent)
    await outage.begin(agent)
    await plug(agent)
    assert "started" in await agent.swipe("OLD")


async def test_a_connector_zero_reservation_holds_the_available_connector_not_the_waiting_driver(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """Two connectors, a driver's car waiting on 1: ReserveNow(0) is accepted for
    connector 2, which is then held (Reserved) -- a stranger cannot take it, and the
    driver on 1 still charges."""
    agent = await make_agent(connectors=2)
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 2)
    await plug(agent, 1)
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Preparing")
    assert await reserve(csms, 0, "HOLDER", 9) == "Accepted"
    await agent.wait_status(lambda s: s["connectors"][1]["status"] == "Reserved")
    await plug(agent, 2)
    assert "reserved" in await agent.swipe("STRANGER", connector=2)
    assert "started" in await agent.swipe("DRIVER-1", connector=1)
    assert "started" in await agent.swipe("HOLDER", connector=2)


async def test_a_remote_start_onto_a_group_reservation_by_a_card_known_without_a_group_is_rejected(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """The charger knows the card (list, LocalPreAuthorize) and that it has no group:
    nothing is left to ask, so the answer is Rejected, not an Accepted that never starts."""
    agent = await make_agent(ocpp={"LocalPreAuthorize": True})
    await wait_booted(csms)
    outsider = [{"idTag": "OUTSIDER", "idTagInfo": {"status": "Accepted"}}]
    assert await send_list(csms, 1, outsider) == "Accepted"
    assert await reserve(csms, 1, "FLEET-CARD", 3, parent="FLEET") == "Accepted"
    await plug(agent)
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="OUTSIDER", connector_id=1))
    assert result["status"] == "Rejected"


async def test_free_vend_plugging_in_starts_a_transaction_with_the_configured_id_tag(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """A home charger without a card reader: plugging the car in starts charging (and the
    transaction the CSMS bills and switches on and off); unplugging ends it; plugging in
    again starts the next one."""
    agent = await make_agent(agent_extra='free_vend_id_tag = "HOME"')
    await wait_booted(csms)
    mark = len(csms.received)
    await plug(agent)
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "HOME"
    assert "Authorize" not in [r.action for r in csms.received[mark:]]
    await csms.wait_message("StatusNotification", lambda p: p["status"] == "Charging", after=mark)
    await unplug(agent)
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["reason"] == "EVDisconnected"
    mark = len(csms.received)
    await plug(agent)
    again = await csms.wait_message("StartTransaction", after=mark)
    assert again.payload["idTag"] == "HOME"


async def test_free_vend_respects_a_reservation_for_someone_else(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent = await make_agent(agent_extra='free_vend_id_tag = "HOME"')
    await wait_booted(csms)
    assert await reserve(csms, 1, "VISITOR", 5) == "Accepted"
    mark = len(csms.received)
    await plug(agent)
    await agent.wait_status(lambda s: s["connectors"][0]["vehicle"] != "absent")
    assert "started" in await agent.swipe("VISITOR")
    start = await csms.wait_message("StartTransaction", after=mark)
    assert (start.payload["idTag"], start.payload["reservationId"]) == ("VISITOR", 5)
    assert len(csms.messages("StartTransaction")) == 1


async def test_without_free_vend_plugging_in_starts_nothing(
    booted: RunningAgent, csms: Csms
) -> None:
    mark = len(csms.received)
    await plug(booted)
    await csms.wait_message("StatusNotification", lambda p: p["status"] == "Preparing", after=mark)
    await asyncio.sleep(1.0)
    assert "StartTransaction" not in [r.action for r in csms.received[mark:]]


async def test_free_vend_resumes_charging_after_a_restart_with_the_car_still_plugged_in(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """A power cut: the open transaction is closed (PowerLoss or Reboot) and, the car
    still being plugged in, a new one starts: a home charger charges again by itself."""
    agent = await make_agent(agent_extra='free_vend_id_tag = "HOME"')
    await wait_booted(csms)
    await plug(agent)
    await csms.wait_message("StartTransaction")
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    await csms.wait_message("StopTransaction", after=mark)
    first = csms.messages("StartTransaction")[0]

    def new_starts() -> list[dict[str, Any]]:  # (the first may be sent again: same content)
        return [m for m in csms.messages("StartTransaction") if m != first]

    await csms.wait_for(lambda: len(new_starts()) == 1)
    assert new_starts()[-1]["idTag"] == "HOME"
    # The new transaction runs: only the old one was closed (a plug-in seen while the
    # agent starts must not open a transaction that the restart then closes too).
    await agent.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    assert [m["reason"] for m in csms.messages("StopTransaction")] == ["PowerLoss"]
