"""Reservation requests (OCPP 1.6 sections 5.13, 5.2): ReserveNow, CancelReservation. The
logic is in :mod:`agent.features.reservation.service`."""

from __future__ import annotations

from typing import Any

from ocpp.routing import on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.ocpp.handlers import Handlers


class ReservationHandlers(Handlers):
    @on(Action.reserve_now)
    def on_reserve_now(self, connector_id: int, expiry_date: str, id_tag: str,
                       reservation_id: int, parent_id_tag: str | None = None,
                       **_: Any) -> Any:  # fmt: skip
        status = self.features.reservation.reserve_now(
            connector_id, expiry_date, id_tag, parent_id_tag, reservation_id
        )
        return call_result.ReserveNow(status=status)

    @on(Action.cancel_reservation)
    def on_cancel_reservation(self, reservation_id: int, **_: Any) -> Any:
        return call_result.CancelReservation(
            status=self.features.reservation.cancel(reservation_id)
        )
