"""The OCPP configuration key registry: types, access, ChangeConfiguration answers."""

from __future__ import annotations

import pytest

from agent.core.config_keys import Access, ChangeResult
from agent.features.registry import KEYS, SPECS, ConfigKeys

CORE_KEYS = {
    "AllowOfflineTxForUnknownId", "AuthorizationCacheEnabled", "AuthorizeRemoteTxRequests",
    "BlinkRepeat", "ClockAlignedDataInterval", "ConnectionTimeOut", "ConnectorPhaseRotation",
    "ConnectorPhaseRotationMaxLength", "GetConfigurationMaxKeys", "HeartbeatInterval",
    "LightIntensity", "LocalAuthorizeOffline", "LocalPreAuthorize", "MaxEnergyOnInvalidId",
    "MeterValuesAlignedData", "MeterValuesAlignedDataMaxLength", "MeterValuesSampledData",
    "MeterValuesSampledDataMaxLength", "MeterValueSampleInterval", "MinimumStatusDuration",
    "NumberOfConnectors", "ResetRetries", "StopTransactionOnEVSideDisconnect",
    "StopTransactionOnInvalidId", "StopTxnAlignedData", "StopTxnAlignedDataMaxLength",
    "StopTxnSampledData", "StopTxnSampledDataMaxLength", "SupportedFeatureProfiles",
    "SupportedFeatureProfilesMaxLength", "TransactionMessageAttempts",
    "TransactionMessageRetryInterval", "UnlockConnectorOnEVSideDisconnect",
    "WebSocketPingInterval",
}  # fmt: skip


def test_every_core_key_of_section_9_1_is_present() -> None:
    assert set(SPECS) >= CORE_KEYS


def test_defaults_are_valid_for_their_own_spec() -> None:
    for spec in KEYS:
        if spec.access is Access.WRITE_ONLY:
            continue
        assert spec.parse(spec.default) == spec.default, spec.name


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("MeterValueSampleInterval", "5", ChangeResult.ACCEPTED),
        ("MeterValueSampleInterval", "abc", ChangeResult.REJECTED),
        ("MeterValueSampleInterval", "-1", ChangeResult.REJECTED),
        ("HeartbeatInterval", "1.5", ChangeResult.REJECTED),
        ("AuthorizeRemoteTxRequests", "TRUE", ChangeResult.ACCEPTED),
        ("AuthorizeRemoteTxRequests", "yes", ChangeResult.REJECTED),
        ("MeterValuesSampledData", "Energy.Active.Import.Register,Power.Active.Import",
         ChangeResult.ACCEPTED),
        ("MeterValuesSampledData", "Energy.Active.Import.Register,Foo.Bar", ChangeResult.REJECTED),
        ("MeterValuesSampledData", "SoC", ChangeResult.REJECTED),
        ("MeterValuesSampledData", "Voltage,,Voltage", ChangeResult.REJECTED),
        ("NumberOfConnectors", "2", ChangeResult.REJECTED),
        ("NoSuchKey", "1", ChangeResult.NOT_SUPPORTED),
        ("ConnectorPhaseRotation", "1.RST", ChangeResult.REBOOT_REQUIRED),
        ("ConnectorPhaseRotation", "0.NotApplicable,1.TSR", ChangeResult.REBOOT_REQUIRED),
        ("ConnectorPhaseRotation", "nonsense", ChangeResult.REJECTED),
        ("ConnectorPhaseRotation", "1.XYZ", ChangeResult.REJECTED),
        ("AuthorizationKey", "short", ChangeResult.REJECTED),
        ("AuthorizationKey", "x" * 41, ChangeResult.REJECTED),
        ("AuthorizationKey", "0123456789abcdef", ChangeResult.ACCEPTED),
    ],
)  # fmt: skip
def test_change_configuration_answers(key: str, value: str, expected: ChangeResult) -> None:
    assert ConfigKeys().change_configuration(key, value) is expected


def test_rejected_change_keeps_the_old_value_and_notifies_nobody() -> None:
    keys = ConfigKeys()
    seen: list[tuple[str, str]] = []
    keys.subscribe(lambda k, v: seen.append((k, v)))
    keys.change_configuration("MeterValueSampleInterval", "abc")
    assert keys.get_int("MeterValueSampleInterval") == 60
    assert seen == []
    keys.change_configuration("MeterValueSampleInterval", " 15 ")
    assert keys.get_int("MeterValueSampleInterval") == 15
    assert seen == [("MeterValueSampleInterval", "15")]


def test_authorization_key_is_write_only() -> None:
    keys = ConfigKeys()
    keys.change_configuration("AuthorizationKey", "0123456789abcdef-secret")
    known, unknown = keys.get_configuration(None)
    assert "AuthorizationKey" not in [k for k, _, _ in known]
    assert all("0123456789abcdef-secret" not in v for _, _, v in known)
    known, unknown = keys.get_configuration(["AuthorizationKey", "HeartbeatInterval", "Nope"])
    assert [k for k, _, _ in known] == ["HeartbeatInterval"]
    assert unknown == ["AuthorizationKey", "Nope"]


def test_stored_values_win_over_overrides_but_not_for_read_only_keys() -> None:
    keys = ConfigKeys(
        stored={"HeartbeatInterval": "42", "NumberOfConnectors": "9"},
        overrides={"HeartbeatInterval": 100, "MeterValuesSampledData": ["Voltage", "Frequency"]},
        fixed={"NumberOfConnectors": "2"},
    )
    assert keys.get_int("HeartbeatInterval") == 42
    assert keys.get_list("MeterValuesSampledData") == ["Voltage", "Frequency"]
    assert keys.get_int("NumberOfConnectors") == 2


def test_bad_override_names_the_key() -> None:
    with pytest.raises(ValueError, match="MeterValueSampleInterval"):
        ConfigKeys(overrides={"MeterValueSampleInterval": "often"})
    with pytest.raises(ValueError, match="Bogus"):
        ConfigKeys(overrides={"Bogus": 1})
