"""Table tests of the pure security rules: profile changes, fallback, events, renewal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.core.security import (
    CRITICAL,
    EventType,
    Prerequisites,
    ProfileDecision,
    fallback_due,
    is_critical,
    profile_change,
    renewal_due,
    tech_info,
)

ALL = Prerequisites(authorization_key=True, csms_root=True, valid_cp_certificate=True)
D = ProfileDecision


@pytest.mark.parametrize(
    ("current", "requested", "have", "expected"),
    [
        (2, 3, ALL, D.ACCEPTED),
        (2, 2, ALL, D.UNCHANGED),
        (3, 3, ALL, D.UNCHANGED),
        (3, 2, ALL, D.DOWNGRADE),
        (2, 1, ALL, D.NOT_SUPPORTED),
        (2, 0, ALL, D.NOT_SUPPORTED),
        (2, 4, ALL, D.NOT_SUPPORTED),
        (1, 2, ALL, D.ACCEPTED),
        (1, 2, Prerequisites(False, True, True), D.NO_AUTHORIZATION_KEY),
        (1, 2, Prerequisites(True, False, True), D.NO_CSMS_ROOT),
        (2, 3, Prerequisites(True, True, False), D.NO_CP_CERTIFICATE),
        (2, 3, Prerequisites(True, False, True), D.NO_CSMS_ROOT),
        # Profile 3 does not use Basic Auth: no AuthorizationKey needed.
        (2, 3, Prerequisites(False, True, True), D.ACCEPTED),
    ],
)
def test_profile_change(current: int, requested: int, have: Prerequisites, expected: D) -> None:
    decision = profile_change(current, requested, have)
    assert decision is expected
    assert decision.accepted is (expected in (D.ACCEPTED, D.UNCHANGED))


T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("elapsed_s", "bound_s", "due"),
    [(0, 60, False), (59.9, 60, False), (60, 60, True), (600, 60, True)],
)
def test_fallback_due(elapsed_s: float, bound_s: float, due: bool) -> None:
    assert fallback_due(T0, T0 + timedelta(seconds=elapsed_s), bound_s) is due


WHITEPAPER_CRITICAL = {
    "FirmwareUpdated": True,
    "FailedToAuthenticateAtCsms": False,
    "CsmsFailedToAuthenticate": False,
    "SettingSystemTime": True,
    "StartupOfTheDevice": True,
    "ResetOrReboot": True,
    "SecurityLogWasCleared": True,
    "ReconfigurationOfSecurityParameters": False,
    "MemoryExhaustion": True,
    "InvalidMessages": False,
    "AttemptedReplayAttacks": False,
    "TamperDetectionActivated": True,
    "InvalidFirmwareSignature": False,
    "InvalidFirmwareSigningCertificate": False,
    "InvalidCentralSystemCertificate": False,
    "InvalidChargePointCertificate": False,
    "InvalidTLSVersion": False,
    "InvalidTLSCipherSuite": False,
}


@pytest.mark.parametrize(("name", "critical"), sorted(WHITEPAPER_CRITICAL.items()))
def test_event_catalog_and_criticality(name: str, critical: bool) -> None:
    assert is_critical(EventType(name)) is critical


def test_catalog_has_exactly_the_whitepaper_events() -> None:
    assert {e.value for e in EventType} == set(WHITEPAPER_CRITICAL)
    assert {e.value for e in CRITICAL} == {k for k, v in WHITEPAPER_CRITICAL.items() if v}


def test_tech_info_is_cut_to_255() -> None:
    assert tech_info("x" * 10) == "x" * 10
    cut = tech_info("y" * 400)
    assert len(cut) == 255
    assert cut.endswith("...")


EXPIRY = T0 + timedelta(days=100)


@pytest.mark.parametrize(
    ("not_after", "now", "last", "due"),
    [
        (None, T0, None, False),
        (EXPIRY, T0, None, False),  # 100 days left, renew at 30
        (EXPIRY, EXPIRY - timedelta(days=30, seconds=1), None, False),
        (EXPIRY, EXPIRY - timedelta(days=30), None, True),
        (EXPIRY, EXPIRY + timedelta(days=1), None, True),  # expired: still try
        (EXPIRY, EXPIRY - timedelta(days=5), EXPIRY - timedelta(days=5, hours=1), False),
        (EXPIRY, EXPIRY - timedelta(days=5), EXPIRY - timedelta(days=6), True),
    ],
)
def test_renewal_due(
    not_after: datetime | None, now: datetime, last: datetime | None, due: bool
) -> None:
    assert (
        renewal_due(not_after=not_after, now=now, renew_days=30, last_attempt=last, retry_s=86400)
        is due
    )
