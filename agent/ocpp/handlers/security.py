"""The OCPP 1.6 security extensions' requests (security whitepaper, edition 3):
CertificateSigned, InstallCertificate, GetInstalledCertificateIds, DeleteCertificate,
ExtendedTriggerMessage. The logic is in :mod:`agent.features.security.service`; a
SecurityProfile change arrives as a ChangeConfiguration (:mod:`agent.ocpp.handlers.core`).

Handlers that check a certificate await a short helper process (``cryptography`` stays out
of the agent's memory), never a CALL; what follows an answer (a reconnect, a
SignCertificate) runs as a background task started from ``@after``.
"""

from __future__ import annotations

from typing import Any

from ocpp.routing import after, on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.ocpp.handlers import Handlers

#: ExtendedTriggerMessage's requestedMessage values served by TriggerMessage's sender.
PLAIN_TRIGGERS = (
    "BootNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "StatusNotification",
)


class SecurityHandlers(Handlers):
    @on(Action.certificate_signed)
    async def on_certificate_signed(self, certificate_chain: str, **_: Any) -> Any:
        status = await self.features.security.certificate_signed(certificate_chain)
        return call_result.CertificateSigned(status=status)

    @after(Action.certificate_signed)
    def after_certificate_signed(self, **_: Any) -> None:
        security = self.features.security
        self.features.spawn(security.after_certificate_signed(), "certificate-signed")

    @on(Action.install_certificate)
    async def on_install_certificate(self, certificate_type: str, certificate: str,
                                     **_: Any) -> Any:  # fmt: skip
        status = await self.features.security.install_certificate(certificate_type, certificate)
        return call_result.InstallCertificate(status=status)

    @on(Action.get_installed_certificate_ids)
    def on_get_installed_certificate_ids(self, certificate_type: str, **_: Any) -> Any:
        status, data = self.features.security.get_installed_certificate_ids(certificate_type)
        return call_result.GetInstalledCertificateIds(
            status=status, certificate_hash_data=data or None
        )

    @on(Action.delete_certificate)
    def on_delete_certificate(self, certificate_hash_data: dict[str, str], **_: Any) -> Any:
        status = self.features.security.delete_certificate(certificate_hash_data)
        return call_result.DeleteCertificate(status=status)

    @on(Action.extended_trigger_message)
    def on_extended_trigger_message(self, requested_message: str,
                                    connector_id: int | None = None, **_: Any) -> Any:  # fmt: skip
        if requested_message == "SignChargePointCertificate":
            status = self.features.security.trigger_sign_certificate()
        elif requested_message == "LogStatusNotification":
            status = "Accepted"
        elif requested_message in PLAIN_TRIGGERS:
            status = self.features.remote_trigger.trigger(requested_message, connector_id)
        else:
            status = "NotImplemented"
        return call_result.ExtendedTriggerMessage(status=status)

    @after(Action.extended_trigger_message)
    def after_extended_trigger_message(self, requested_message: str,
                                       connector_id: int | None = None, **_: Any) -> None:  # fmt: skip
        features = self.features
        if requested_message == "SignChargePointCertificate":
            features.spawn(features.security.send_sign_certificate(), "sign-certificate")
        elif requested_message == "LogStatusNotification":
            features.firmware.service.send_log_status()  # Uploading (requestId) or Idle
        elif requested_message == "FirmwareStatusNotification":
            features.firmware.service.send_firmware_status_now()  # signed: with its requestId
        elif requested_message in PLAIN_TRIGGERS and (
            features.remote_trigger.trigger(requested_message, connector_id) == "Accepted"
        ):
            features.remote_trigger.send_triggered(requested_message, connector_id)
