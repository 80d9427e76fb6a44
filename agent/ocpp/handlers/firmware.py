"""Firmware Management requests (OCPP 1.6 sections 5.19 and 5.9): UpdateFirmware,
GetDiagnostics. The logic is in :mod:`agent.features.firmware.service`; the statuses
follow as FirmwareStatusNotification / DiagnosticsStatusNotification."""

from __future__ import annotations

from typing import Any

from ocpp.exceptions import NotSupportedError, PropertyConstraintViolationError
from ocpp.routing import on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.core.timefmt import parse_time
from agent.ocpp.handlers import Handlers


def _epoch(text: str | None, field: str) -> float | None:
    """An OCPP timestamp as epoch seconds; a CALLERROR (not InternalError) when it is none."""
    if text is None:
        return None
    try:
        return parse_time(text).timestamp()
    except (ValueError, OverflowError):
        raise PropertyConstraintViolationError(
            description=f"{field} is not a date-time: {text[:40]!r}"
        ) from None


class FirmwareHandlers(Handlers):
    @on(Action.update_firmware)
    def on_update_firmware(self, location: str, retrieve_date: str, retries: int | None = None,
                           retry_interval: int | None = None, **_: Any) -> Any:  # fmt: skip
        if not self.features.security.plain_update_allowed():
            raise NotSupportedError(
                description="SignedFirmwareOnly is true: use SignedUpdateFirmware"
            )
        retrieve_at = _epoch(retrieve_date, "retrieveDate")
        assert retrieve_at is not None
        self.features.firmware.update_firmware(location, retrieve_at, retries, retry_interval)
        return call_result.UpdateFirmware()

    @on(Action.get_diagnostics)
    def on_get_diagnostics(self, location: str, retries: int | None = None,
                           retry_interval: int | None = None, start_time: str | None = None,
                           stop_time: str | None = None, **_: Any) -> Any:  # fmt: skip
        name = self.features.firmware.get_diagnostics(
            location,
            _epoch(start_time, "startTime"),
            _epoch(stop_time, "stopTime"),
            retries,
            retry_interval,
        )
        return call_result.GetDiagnostics(file_name=name)
