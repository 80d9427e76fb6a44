"""Firmware Management requests (OCPP 1.6 sections 5.19 and 5.9): UpdateFirmware,
GetDiagnostics, and their security-whitepaper variants SignedUpdateFirmware and GetLog.
The logic is in :mod:`agent.features.firmware.service`; the statuses follow as
FirmwareStatusNotification / DiagnosticsStatusNotification (SignedFirmwareStatusNotification
/ LogStatusNotification for the variants).

GetLog and SignedUpdateFirmware live here, not in the security handlers: they are driven
by the firmware service (its download, upload, retry and install machinery); the security
service contributes only the certificate/signature checks and the security log file."""

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
        self.features.firmware.service.update_firmware(
            location, retrieve_at, retries, retry_interval
        )
        return call_result.UpdateFirmware()

    @on(Action.get_diagnostics)
    def on_get_diagnostics(self, location: str, retries: int | None = None,
                           retry_interval: int | None = None, start_time: str | None = None,
                           stop_time: str | None = None, **_: Any) -> Any:  # fmt: skip
        name = self.features.firmware.service.get_diagnostics(
            location,
            _epoch(start_time, "startTime"),
            _epoch(stop_time, "stopTime"),
            retries,
            retry_interval,
        )
        return call_result.GetDiagnostics(file_name=name)

    @on(Action.signed_update_firmware)
    async def on_signed_update_firmware(self, request_id: int, firmware: dict[str, Any],
                                        retries: int | None = None,
                                        retry_interval: int | None = None,
                                        **_: Any) -> Any:  # fmt: skip
        """SignedUpdateFirmware (security whitepaper): the signing certificate must chain
        to an installed ManufacturerRootCertificate (else InvalidCertificate and the
        InvalidFirmwareSigningCertificate event); the download is verified before any
        install (statuses as SignedFirmwareStatusNotification with ``request_id``)."""
        service = self.features.firmware.service
        if service.installing():
            return call_result.SignedUpdateFirmware(status="Rejected")
        retrieve_at = _epoch(firmware.get("retrieve_date_time"), "retrieveDateTime")
        assert retrieve_at is not None  # required by the schema
        certificate = str(firmware.get("signing_certificate", ""))
        status = await self.features.security.accept_signed_update(certificate)
        if status != "Accepted":
            return call_result.SignedUpdateFirmware(status=status)
        replaced = service.update_pending()
        service.update_firmware(
            str(firmware["location"]),
            retrieve_at,
            retries,
            retry_interval,
            request_id=request_id,
            signature=str(firmware.get("signature", "")),
            signing_certificate=certificate,
        )
        return call_result.SignedUpdateFirmware(
            status="AcceptedCanceled" if replaced else "Accepted"
        )

    @on(Action.get_log)
    def on_get_log(self, log: dict[str, Any], log_type: str, request_id: int,
                   retries: int | None = None, retry_interval: int | None = None,
                   **_: Any) -> Any:  # fmt: skip
        """GetLog (security whitepaper): DiagnosticsLog is the GetDiagnostics bundle,
        SecurityLog the security log; uploaded by the same transfer helper, statuses as
        LogStatusNotification with ``request_id``."""
        location = log.get("remote_location")
        if not isinstance(location, str) or not location:
            raise PropertyConstraintViolationError(description="log.remoteLocation is missing")
        try:
            status, name = self.features.firmware.service.get_log(
                log_type,
                location,
                request_id,
                _epoch(log.get("oldest_timestamp"), "oldestTimestamp"),
                _epoch(log.get("latest_timestamp"), "latestTimestamp"),
                retries,
                retry_interval,
            )
        except ValueError:
            return call_result.GetLog(status="Rejected")
        return call_result.GetLog(status=status, filename=name)
