"""Core profile configuration keys (OCPP 1.6 section 9.1)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.core.config_keys import (
    MAX_CSL_ITEMS,
    PHASE_ROTATION_ITEMS,
    RO,
    KeySpec,
    Kind,
    bool_key,
    int_key,
    measurands_key,
)


def keys(feature_profiles: Sequence[str]) -> tuple[KeySpec, ...]:
    """The Core keys, in GetConfiguration's order; ``SupportedFeatureProfiles`` lists
    ``feature_profiles`` (the profiles this build implements)."""
    return (
        bool_key("AllowOfflineTxForUnknownId", False),
        bool_key("AuthorizationCacheEnabled", True),
        bool_key("AuthorizeRemoteTxRequests", False),
        int_key("BlinkRepeat", 0, minimum=0, maximum=100),
        int_key("ClockAlignedDataInterval", 0, minimum=0, maximum=86400),
        int_key("ConnectionTimeOut", 90, minimum=0, maximum=3600),
        KeySpec(
            "ConnectorPhaseRotation",
            Kind.CSL,
            "0.RST",
            reboot_required=True,
            max_items=MAX_CSL_ITEMS,
            choices=PHASE_ROTATION_ITEMS,
        ),
        int_key("ConnectorPhaseRotationMaxLength", MAX_CSL_ITEMS, access=RO),
        int_key("GetConfigurationMaxKeys", 100, access=RO),
        int_key("HeartbeatInterval", 300, minimum=0, maximum=86400),
        int_key("LightIntensity", 100, minimum=0, maximum=100),
        bool_key("LocalAuthorizeOffline", True),
        bool_key("LocalPreAuthorize", False),
        int_key("MaxEnergyOnInvalidId", 0, minimum=0),
        measurands_key("MeterValuesAlignedData", "Energy.Active.Import.Register"),
        int_key("MeterValuesAlignedDataMaxLength", MAX_CSL_ITEMS, access=RO),
        measurands_key(
            "MeterValuesSampledData",
            "Energy.Active.Import.Register,Power.Active.Import,Current.Import,Voltage,"
            "Current.Offered",
        ),
        int_key("MeterValuesSampledDataMaxLength", MAX_CSL_ITEMS, access=RO),
        int_key("MeterValueSampleInterval", 60, minimum=0, maximum=86400),
        int_key("MinimumStatusDuration", 0, minimum=0, maximum=3600),
        int_key("NumberOfConnectors", 1, access=RO),
        int_key("ResetRetries", 3, minimum=0, maximum=100),
        bool_key("StopTransactionOnEVSideDisconnect", True),
        bool_key("StopTransactionOnInvalidId", True),
        measurands_key("StopTxnAlignedData", ""),
        int_key("StopTxnAlignedDataMaxLength", MAX_CSL_ITEMS, access=RO),
        measurands_key("StopTxnSampledData", "Energy.Active.Import.Register"),
        int_key("StopTxnSampledDataMaxLength", MAX_CSL_ITEMS, access=RO),
        KeySpec("SupportedFeatureProfiles", Kind.CSL, ",".join(feature_profiles), access=RO),
        int_key("SupportedFeatureProfilesMaxLength", 10, access=RO),
        int_key("TransactionMessageAttempts", 3, minimum=1, maximum=100),
        int_key("TransactionMessageRetryInterval", 30, minimum=0, maximum=86400),
        bool_key("UnlockConnectorOnEVSideDisconnect", True),
        int_key("WebSocketPingInterval", 60, minimum=0, maximum=3600),
    )
