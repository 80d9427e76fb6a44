"""Security extension configuration keys (OCPP 1.6 security whitepaper, edition 3).

``SecurityProfile`` is read-write, but a ChangeConfiguration of it must go through
:meth:`agent.features.security.service.SecurityService.change_security_profile` (upgrade
only, prerequisites, reconnect, fallback): the generic path must not set it.
"""

from __future__ import annotations

from agent.core.config_keys import RO, Access, KeySpec, Kind, bool_key, int_key

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
    # Values 2 and 3 (the agent only speaks wss://); see the module docstring.
    int_key("SecurityProfile", 2, minimum=0, maximum=3),
    KeySpec("CpoName", Kind.STR, "", max_length=64),
    int_key("CertificateSignedMaxChainSize", MAX_CHAIN_SIZE, access=RO, maximum=MAX_CHAIN_SIZE),
    int_key("CertificateStoreMaxLength", 20, access=RO, minimum=1),
    bool_key("AdditionalRootCertificateCheck", False, access=RO),
    # evcp's own (not in the whitepaper), documented in docs/security.md:
    # refuse plain UpdateFirmware once signed updates are in use;
    bool_key("SignedFirmwareOnly", False),
    # renew the charge-point certificate this many days before it expires.
    int_key("CertificateRenewalDays", 30, minimum=1, maximum=365),
)
