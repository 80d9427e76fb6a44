"""The Firmware Management profile's OCPP configuration keys (OCPP 1.6 section 9.3)."""

from __future__ import annotations

from agent.core.config_keys import Access, KeySpec, Kind

#: The name to add to SupportedFeatureProfiles once this feature is wired in.
FEATURE_PROFILE = "FirmwareManagement"

#: Every protocol the transfer helper speaks, in the spelling OCPP uses.
ALL_PROTOCOLS = ("FTP", "FTPS", "HTTP", "HTTPS")


def supported_protocols(allow_http: bool) -> str:
    """SupportedFileTransferProtocols: what works with this config. Without ``[firmware]
    allow_http`` the clear-text ones (FTP, HTTP) are refused, so they are not reported."""
    if allow_http:
        return ",".join(ALL_PROTOCOLS)
    return "FTPS,HTTPS"


def keys(allow_http: bool) -> tuple[KeySpec, ...]:
    """The keys to add to the registry (read-only: the config decides, not the CSMS)."""
    return (
        KeySpec(
            "SupportedFileTransferProtocols",
            Kind.CSL,
            supported_protocols(allow_http),
            access=Access.READ_ONLY,
            choices=ALL_PROTOCOLS,
        ),
    )
