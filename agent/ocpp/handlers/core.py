"""Core profile requests (OCPP 1.6 section 5): ChangeAvailability, ChangeConfiguration,
ClearCache, DataTransfer, GetConfiguration, RemoteStart/StopTransaction, Reset,
UnlockConnector. The logic is in :mod:`agent.features.core.service`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ocpp.charge_point import snake_to_camel_case
from ocpp.exceptions import OccurenceConstraintViolationError
from ocpp.routing import after, on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.core.security import EventType
from agent.features.registry import is_secret
from agent.ocpp.handlers import Handlers

log = logging.getLogger("evcp.ocpp")

#: How long UnlockConnector may wait for the transaction's stop and the lock driver.
UNLOCK_TIMEOUT_S = 5


class CoreHandlers(Handlers):
    _changed_key: str | None = None

    @on(Action.change_availability)
    def on_change_availability(self, connector_id: int, type: str, **_: Any) -> Any:
        status = self.features.core.change_availability(connector_id, type == "Operative")
        return call_result.ChangeAvailability(status=status)

    @on(Action.change_configuration)
    def on_change_configuration(self, key: str, value: str, **_: Any) -> Any:
        if key == "SecurityProfile":
            # Upgrade only, with its prerequisites; persisted once the new profile has
            # connected (the security service), never through the generic path.
            status = self.features.security.change_security_profile(value)
            self._changed_key = key if status == "Accepted" else None
            return call_result.ChangeConfiguration(status=status)
        result = self.keys.change_configuration(key, value)
        shown = "<redacted>" if is_secret(key) else repr(value)
        log.info("ChangeConfiguration %s = %s: %s", key, shown, result.value)
        self._changed_key = key if result.value in ("Accepted", "RebootRequired") else None
        return call_result.ChangeConfiguration(status=result.value)

    @after(Action.change_configuration)
    def after_change_configuration(self, key: str, value: str, **_: Any) -> None:
        # Act only on a change that was accepted: a rejected AuthorizationKey (say, too
        # short) must not become the password, or the CSMS would lock the charger out.
        changed, self._changed_key = self._changed_key, None
        if changed != key:
            return
        if key == "SecurityProfile":
            security = self.features.security
            self.features.spawn(security.apply_security_profile(), "security-profile")
            return
        self.control.apply_change(key, value)

    @on(Action.clear_cache)
    def on_clear_cache(self, **_: Any) -> Any:
        return call_result.ClearCache(status=self.features.core.clear_cache())

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> Any:
        log.info("DataTransfer from vendor %r: no vendor extensions here", vendor_id)
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.get_configuration)
    def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> Any:
        max_keys = self.keys.get_int("GetConfigurationMaxKeys")
        if key is not None and len(key) > max_keys:
            # Refused as a whole, not cut short: the CSMS learns it asked for too many
            # (and how many it may ask for) instead of missing keys without a word.
            raise OccurenceConstraintViolationError(
                description=f"{len(key)} keys requested; GetConfigurationMaxKeys is {max_keys}"
            )
        known, unknown = self.keys.get_configuration(key or None)
        return call_result.GetConfiguration(
            configuration_key=[{"key": k, "readonly": ro, "value": v} for k, ro, v in known],
            unknown_key=unknown or None,
        )

    @on(Action.remote_start_transaction)
    def on_remote_start(self, id_tag: str, connector_id: int | None = None,
                        charging_profile: dict[str, Any] | None = None, **_: Any) -> Any:  # fmt: skip
        body = snake_to_camel_case(charging_profile) if charging_profile else None
        status = self.features.core.remote_start(id_tag, connector_id, body)
        return call_result.RemoteStartTransaction(status=status)

    @on(Action.remote_stop_transaction)
    def on_remote_stop(self, transaction_id: int, **_: Any) -> Any:
        status = self.features.core.remote_stop(transaction_id)
        return call_result.RemoteStopTransaction(status=status)

    @on(Action.reset)
    def on_reset(self, type: str, **_: Any) -> Any:
        return call_result.Reset(status="Accepted")

    @after(Action.reset)
    def after_reset(self, type: str, **_: Any) -> None:
        self.features.security.raise_event(EventType.RESET_OR_REBOOT, f"{type} reset by the CSMS")
        self.features.core.reset(type)

    @on(Action.unlock_connector)
    async def on_unlock(self, connector_id: int, **_: Any) -> Any:
        # Awaits the driver (not a CALL), briefly: the answer says whether the lock opened.
        # Never cancelled half-way (a stop under way must finish): after the wait, the
        # answer is UnlockFailed and the unlock carries on by itself.
        task = self.features.core.start_unlock(connector_id)
        finished, _pending = await asyncio.wait({task}, timeout=UNLOCK_TIMEOUT_S)
        if not finished:
            log.error("connector %d: no unlock within %d s", connector_id, UNLOCK_TIMEOUT_S)
        return call_result.UnlockConnector(status=task.result() if finished else "UnlockFailed")
