"""The Remote Trigger profile: TriggerMessage (OCPP 1.6 section 5.17).

:meth:`RemoteTrigger.trigger` answers the request; :meth:`RemoteTrigger.send_triggered`
queues the message asked for, after the answer has gone (an ``@after`` handler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.outbox import Outgoing

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort

#: A message a feature sends when triggered: requestedMessage -> sender(connector_id).
TriggerSender = Callable[[int | None], None]


class RemoteTrigger:
    """TriggerMessage. Features that own a triggered message (Firmware Management's
    FirmwareStatusNotification, say) register its sender with :meth:`register`; until
    one does, the message is answered with the profile's idle status."""

    def __init__(self, *, port: ChargePointPort) -> None:
        self.port = port
        self._senders: dict[str, TriggerSender] = {}

    def register(self, message: str, sender: TriggerSender) -> None:
        self._senders[message] = sender

    def send_log_status(self) -> None:
        """ExtendedTriggerMessage(LogStatusNotification): no log upload is under way."""
        self.port.outbox.send(Outgoing("LogStatusNotification", {"status": "Idle"}))

    def trigger(self, message: str, connector_id: int | None) -> str:
        port = self.port
        known = connector_id is None or connector_id in port.connectors
        if not known and not (
            connector_id == 0 and message in ("StatusNotification", "MeterValues")
        ):
            return "Rejected"
        return "Accepted"

    def send_triggered(self, message: str, connector_id: int | None) -> None:
        """Queue the message a TriggerMessage asked for (after the Accepted was sent)."""
        port = self.port
        if (sender := self._senders.get(message)) is not None:
            sender(connector_id)
        elif message == "BootNotification":
            port.request_boot()
        elif message == "Heartbeat":
            port.outbox.send(Outgoing("Heartbeat", {}))
        elif message == "StatusNotification":
            if connector_id is None:
                for each in (0, *port.connectors):
                    port.send_status(each, triggered=True)
            else:
                port.send_status(connector_id, triggered=True)
        elif message == "MeterValues":
            targets = (
                list(port.connectors.values())
                if connector_id in (None, 0)
                else [port.connectors[int(connector_id or 0)]]
            )
            for c in targets:
                meter_values = port.triggered_meter_values(c)
                if not meter_values:
                    continue
                payload: dict[str, Any] = {"connectorId": c.id, "meterValue": meter_values}
                if c.tx is not None and (tx_id := port.csms_transaction_id(c)):
                    payload["transactionId"] = tx_id
                # In timestamp order with the transaction's queued MeterValues: after them.
                port.outbox.send(Outgoing("MeterValues", payload, after_queue=c.tx is not None))
        elif message == "DiagnosticsStatusNotification":
            port.outbox.send(Outgoing("DiagnosticsStatusNotification", {"status": "Idle"}))
        elif message == "FirmwareStatusNotification":
            port.outbox.send(Outgoing("FirmwareStatusNotification", {"status": "Idle"}))
