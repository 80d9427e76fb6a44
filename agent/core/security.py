"""Pure rules of the OCPP 1.6 security extensions (security whitepaper, edition 3).

- :func:`profile_change`: may ``SecurityProfile`` go from one value to another (upgrade only,
  with the prerequisites of the target profile)?
- :func:`fallback_due`: has a reconnect with a new profile taken too long (fall back)?
- :data:`EVENTS`: the whitepaper's security events the agent can raise, and which are
  critical (critical ones are queued durably and always reach the CSMS).
- :func:`renewal_due`: should the charge point ask for a new certificate (it expires soon)?

No I/O and no clock: time is an argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

#: Profiles the agent can run: 2 (TLS + Basic Auth) and 3 (TLS with a client certificate).
#: 0 and 1 (no TLS) are refused by design: the agent only speaks wss://.
SUPPORTED_PROFILES = (2, 3)


class ProfileDecision(enum.StrEnum):
    """Why a SecurityProfile change was accepted or rejected (for the log)."""

    ACCEPTED = "accepted"
    UNCHANGED = "unchanged"  # same value: Accepted, nothing to do
    NOT_SUPPORTED = "not supported"
    DOWNGRADE = "downgrade"
    NO_AUTHORIZATION_KEY = "no AuthorizationKey"
    NO_CSMS_ROOT = "no CSMS root certificate"
    NO_CP_CERTIFICATE = "no valid charge-point certificate"

    @property
    def accepted(self) -> bool:
        return self in (ProfileDecision.ACCEPTED, ProfileDecision.UNCHANGED)


@dataclass(frozen=True, slots=True)
class Prerequisites:
    """What the charge point has, for :func:`profile_change`."""

    authorization_key: bool
    csms_root: bool
    valid_cp_certificate: bool


def profile_change(current: int, requested: int, have: Prerequisites) -> ProfileDecision:
    """ChangeConfiguration(SecurityProfile): upgrade only, prerequisites present.

    Profile 2 needs an AuthorizationKey and a CSMS root; profile 3 a valid charge-point
    certificate and a CSMS root (its Basic Auth is not used). A lower value is rejected.
    """
    if requested == current:
        return ProfileDecision.UNCHANGED
    if requested not in SUPPORTED_PROFILES:
        return ProfileDecision.NOT_SUPPORTED
    if requested < current:
        return ProfileDecision.DOWNGRADE
    if not have.csms_root:
        return ProfileDecision.NO_CSMS_ROOT
    if requested == 2 and not have.authorization_key:
        return ProfileDecision.NO_AUTHORIZATION_KEY
    if requested == 3 and not have.valid_cp_certificate:
        return ProfileDecision.NO_CP_CERTIFICATE
    return ProfileDecision.ACCEPTED


def fallback_due(started: datetime, now: datetime, bound_s: float) -> bool:
    """True once a reconnect with a new profile (or certificate) has run past ``bound_s``
    without connecting: the agent then goes back to what worked before."""
    return (now - started).total_seconds() >= bound_s


class EventType(enum.StrEnum):
    """SecurityEventNotification types (whitepaper appendix, "Security events")."""

    FIRMWARE_UPDATED = "FirmwareUpdated"
    FAILED_TO_AUTHENTICATE_AT_CSMS = "FailedToAuthenticateAtCsms"
    CSMS_FAILED_TO_AUTHENTICATE = "CsmsFailedToAuthenticate"
    SETTING_SYSTEM_TIME = "SettingSystemTime"
    STARTUP_OF_THE_DEVICE = "StartupOfTheDevice"
    RESET_OR_REBOOT = "ResetOrReboot"
    SECURITY_LOG_WAS_CLEARED = "SecurityLogWasCleared"
    RECONFIGURATION_OF_SECURITY_PARAMETERS = "ReconfigurationOfSecurityParameters"
    MEMORY_EXHAUSTION = "MemoryExhaustion"
    INVALID_MESSAGES = "InvalidMessages"
    ATTEMPTED_REPLAY_ATTACKS = "AttemptedReplayAttacks"
    TAMPER_DETECTION_ACTIVATED = "TamperDetectionActivated"
    INVALID_FIRMWARE_SIGNATURE = "InvalidFirmwareSignature"
    INVALID_FIRMWARE_SIGNING_CERTIFICATE = "InvalidFirmwareSigningCertificate"
    INVALID_CENTRAL_SYSTEM_CERTIFICATE = "InvalidCentralSystemCertificate"
    INVALID_CHARGE_POINT_CERTIFICATE = "InvalidChargePointCertificate"
    INVALID_TLS_VERSION = "InvalidTLSVersion"
    INVALID_TLS_CIPHER_SUITE = "InvalidTLSCipherSuite"


#: The critical events of the whitepaper's table: sent to the CSMS through the durable
#: queue (like transaction messages). The others are kept in the security log and sent
#: while the agent runs (best effort).
CRITICAL: frozenset[EventType] = frozenset(
    {
        EventType.FIRMWARE_UPDATED,
        EventType.SETTING_SYSTEM_TIME,
        EventType.STARTUP_OF_THE_DEVICE,
        EventType.RESET_OR_REBOOT,
        EventType.SECURITY_LOG_WAS_CLEARED,
        EventType.MEMORY_EXHAUSTION,
        EventType.TAMPER_DETECTION_ACTIVATED,
    }
)


def is_critical(event: EventType) -> bool:
    return event in CRITICAL


#: SecurityEventNotification.req techInfo is string[0..255].
TECH_INFO_MAX = 255


def tech_info(text: str) -> str:
    """``text`` cut to the 255 characters techInfo may hold."""
    return text if len(text) <= TECH_INFO_MAX else text[: TECH_INFO_MAX - 3] + "..."


def renewal_due(
    *,
    not_after: datetime | None,
    now: datetime,
    renew_days: int,
    last_attempt: datetime | None,
    retry_s: float,
) -> bool:
    """Should the charge point send a SignCertificate of its own?

    Yes when its certificate expires within ``renew_days`` days (or has expired), and no
    attempt was made in the last ``retry_s`` seconds. No certificate: no renewal (the CSMS
    starts that with ExtendedTriggerMessage).
    """
    if not_after is None:
        return False
    if now < not_after - timedelta(days=renew_days):
        return False
    return last_attempt is None or (now - last_attempt).total_seconds() >= retry_s
