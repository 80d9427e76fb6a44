"""OCPP configuration keys of the security extensions (1.6 security whitepaper, edition 3).

``SecurityProfile`` and ``AuthorizationKey`` replace the entries of the same name in
``agent/core/config_keys.py``. ChangeConfiguration of ``SecurityProfile`` must go through
:meth:`agent.features.security.service.SecurityService.change_security_profile` (upgrade
only, prerequisites, reconnect, fallback); the generic path must not set it.
"""

from __future__ import annotations

from agent.core.config_keys import Access, KeySpec, Kind

#: The whitepaper's upper bound for CertificateSignedMaxChainSize (characters).
MAX_CHAIN_SIZE = 10000

KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "AuthorizationKey",
        Kind.STR,
        "",
        access=Access.WRITE_ONLY,
        min_length=16,
        max_length=40,
    ),
    # Read-write; see the module docstring. Values 2 and 3 (the agent only speaks wss://).
    KeySpec("SecurityProfile", Kind.INT, "2", minimum=0, maximum=3),
    KeySpec("CpoName", Kind.STR, "", max_length=64),
    KeySpec(
        "CertificateSignedMaxChainSize",
        Kind.INT,
        str(MAX_CHAIN_SIZE),
        access=Access.READ_ONLY,
        minimum=0,
        maximum=MAX_CHAIN_SIZE,
    ),
    KeySpec("CertificateStoreMaxLength", Kind.INT, "20", access=Access.READ_ONLY, minimum=1),
    KeySpec("AdditionalRootCertificateCheck", Kind.BOOL, "false", access=Access.READ_ONLY),
    # Whitepaper Firmware Management keys: none are defined besides the messages. These two
    # are evcp's own (not in the whitepaper), documented in etc/evcp.toml:
    # refuse plain UpdateFirmware once signed updates are in use;
    KeySpec("SignedFirmwareOnly", Kind.BOOL, "false"),
    # renew the charge-point certificate this many days before it expires.
    KeySpec("CertificateRenewalDays", Kind.INT, "30", minimum=1, maximum=365),
)
