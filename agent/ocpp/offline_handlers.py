"""CSMS requests of the Local Auth List Management and Reservation profiles.

:class:`OfflineHandlers` is a mixin for :class:`agent.ocpp.adapter.OcppAdapter` (the
``ocpp`` library finds ``@on`` handlers on every base class). Like the other handlers,
these answer at once and never await a CALL; the work happens in :mod:`agent.auth` and
:mod:`agent.reservations` through the station.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ocpp.charge_point import snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

if TYPE_CHECKING:
    from agent.station import Station

log = logging.getLogger("evcp.ocpp")


class OfflineHandlers:
    """SendLocalList, GetLocalListVersion, ReserveNow and CancelReservation."""

    station: Station

    # ------------------------------------------------------------------ Local Auth List
    @on(Action.send_local_list)
    def on_send_local_list(self, list_version: int, update_type: str,
                           local_authorization_list: list[dict[str, Any]] | None = None,
                           **_: Any) -> Any:  # fmt: skip
        entries = [snake_to_camel_case(item) for item in local_authorization_list or []]
        status = self.station.auth.send_local_list(list_version, str(update_type), entries)
        return call_result.SendLocalList(status=status)

    @on(Action.get_local_list_version)
    def on_get_local_list_version(self, **_: Any) -> Any:
        return call_result.GetLocalListVersion(list_version=self.station.auth.list_version())

    # ------------------------------------------------------------------ Reservation
    @on(Action.reserve_now)
    def on_reserve_now(self, connector_id: int, expiry_date: str, id_tag: str,
                       reservation_id: int, parent_id_tag: str | None = None,
                       **_: Any) -> Any:  # fmt: skip
        status = self.station.reservations.reserve_now(
            connector_id, expiry_date, id_tag, parent_id_tag, reservation_id
        )
        return call_result.ReserveNow(status=status)

    @on(Action.cancel_reservation)
    def on_cancel_reservation(self, reservation_id: int, **_: Any) -> Any:
        return call_result.CancelReservation(
            status=self.station.reservations.cancel(reservation_id)
        )
