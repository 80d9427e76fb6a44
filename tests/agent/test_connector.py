"""The connector status decision table, row by row (h11 style: inputs -> status)."""

from __future__ import annotations

import pytest

from agent.core.connector import (
    RULES,
    ConnectorInputs,
    Status,
    connector_zero_status,
    derive_status,
    error_code,
)
from drivers.base import FaultCode, VehicleState

A, B, C = VehicleState.ABSENT, VehicleState.CONNECTED, VehicleState.CHARGING
REQ = VehicleState.REQUESTING


@pytest.mark.parametrize(
    ("inputs", "status"),
    [
        (ConnectorInputs(), Status.AVAILABLE),
        (ConnectorInputs(vehicle=B), Status.PREPARING),
        (ConnectorInputs(waiting_for_vehicle=True), Status.PREPARING),
        (ConnectorInputs(vehicle=C, transaction=True), Status.CHARGING),
        (ConnectorInputs(vehicle=B, transaction=True), Status.SUSPENDED_EV),
        (ConnectorInputs(vehicle=A, transaction=True), Status.SUSPENDED_EV),
        (ConnectorInputs(vehicle=REQ, transaction=True), Status.SUSPENDED_EVSE),
        (ConnectorInputs(vehicle=B, transaction=True, paused_by_evse=True), Status.SUSPENDED_EVSE),
        (ConnectorInputs(vehicle=B, finishing=True), Status.FINISHING),
        (ConnectorInputs(vehicle=A, finishing=True), Status.AVAILABLE),
        (ConnectorInputs(reserved=True), Status.RESERVED),
        (ConnectorInputs(operative=False), Status.UNAVAILABLE),
        (ConnectorInputs(operative=False, vehicle=C, transaction=True), Status.CHARGING),
        (ConnectorInputs(fault=FaultCode.GROUND_FAULT, vehicle=C, transaction=True),
         Status.FAULTED),
        (ConnectorInputs(meter_failed=True), Status.FAULTED),
        (ConnectorInputs(operative=False, fault=FaultCode.OTHER), Status.FAULTED),
    ],
)  # fmt: skip
def test_status_table(inputs: ConnectorInputs, status: Status) -> None:
    assert derive_status(inputs) is status


def test_every_status_but_connector_zero_is_reachable() -> None:
    reached = {rule.status for rule in RULES}
    assert reached == set(Status)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (FaultCode.GROUND_FAULT, "GroundFailure"),
        (FaultCode.NO_GROUND, "GroundFailure"),
        (FaultCode.OVER_TEMPERATURE, "HighTemperature"),
        (FaultCode.OVER_CURRENT, "OverCurrentFailure"),
        (FaultCode.STUCK_RELAY, "PowerSwitchFailure"),
        (FaultCode.COMMUNICATION, "InternalError"),
    ],
)
def test_error_codes(fault: FaultCode, code: str) -> None:
    assert error_code(ConnectorInputs(fault=fault)) == code


def test_every_fault_has_an_ocpp_error_code() -> None:
    for fault in FaultCode:
        assert error_code(ConnectorInputs(fault=fault)) != "NoError"
    assert error_code(ConnectorInputs(meter_failed=True)) == "PowerMeterFailure"
    assert error_code(ConnectorInputs()) == "NoError"


def test_connector_zero() -> None:
    assert connector_zero_status(operative=True, faulted=False) is Status.AVAILABLE
    assert connector_zero_status(operative=False, faulted=False) is Status.UNAVAILABLE
    assert connector_zero_status(operative=True, faulted=True) is Status.FAULTED


def test_docs_page_matches_the_table() -> None:
    from pathlib import Path

    from agent.core.connector import rules_markdown

    page = Path(__file__).parents[2] / "docs" / "connector-status.md"
    assert page.read_text() == rules_markdown(), "regenerate docs/connector-status.md"
