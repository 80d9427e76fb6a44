"""Local Auth List Management requests (OCPP 1.6 sections 5.15, 5.10): SendLocalList,
GetLocalListVersion. The logic is in :mod:`agent.features.local_auth_list`."""

from __future__ import annotations

from typing import Any

from ocpp.charge_point import snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.ocpp.handlers import Handlers


class LocalAuthListHandlers(Handlers):
    # (The adapter answers SendLocalList itself, without the library's case conversion
    # of the list: OcppAdapter._send_local_list. This handler declares the action and is
    # what the library would call.)
    @on(Action.send_local_list)
    def on_send_local_list(self, list_version: int, update_type: str,
                           local_authorization_list: list[dict[str, Any]] | None = None,
                           **_: Any) -> Any:  # fmt: skip
        entries = [snake_to_camel_case(item) for item in local_authorization_list or []]
        status = self.features.local_auth_list.send_local_list(
            list_version, str(update_type), entries
        )
        return call_result.SendLocalList(status=status)

    @on(Action.get_local_list_version)
    def on_get_local_list_version(self, **_: Any) -> Any:
        version = self.features.local_auth_list.list_version()
        return call_result.GetLocalListVersion(list_version=version)
