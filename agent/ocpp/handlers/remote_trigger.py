"""Remote Trigger requests (OCPP 1.6 section 5.17): TriggerMessage. The logic is in
:mod:`agent.features.remote_trigger.service`."""

from __future__ import annotations

from typing import Any

from ocpp.routing import after, on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.ocpp.handlers import Handlers


class RemoteTriggerHandlers(Handlers):
    @on(Action.trigger_message)
    def on_trigger_message(self, requested_message: str, connector_id: int | None = None,
                           **_: Any) -> Any:  # fmt: skip
        status = self.features.remote_trigger.trigger(requested_message, connector_id)
        return call_result.TriggerMessage(status=status)

    @after(Action.trigger_message)
    def after_trigger_message(self, requested_message: str, connector_id: int | None = None,
                              **_: Any) -> None:  # fmt: skip
        trigger = self.features.remote_trigger
        if trigger.trigger(requested_message, connector_id) == "Accepted":
            trigger.send_triggered(requested_message, connector_id)
