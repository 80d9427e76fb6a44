"""Reservation profile: ReserveNow, CancelReservation."""
