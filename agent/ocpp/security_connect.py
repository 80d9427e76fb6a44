"""How the session connects for a security profile: the TLS context and the Basic Auth
password (profile 2), or the charge point's certificate and no password (profile 3)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from agent.features.security.certs import CertStore
from agent.ocpp.transport import tls_context


class NoCertificateError(Exception):
    """Profile 3 without a charge-point certificate in the store."""


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    ssl_context: ssl.SSLContext
    #: The Basic Auth password, or None (profile 3: the certificate is the credential).
    password: str | None
    client_certificate: bool


def connect_settings(
    profile: int, *, store: CertStore, ca_file: str, password: str
) -> ConnectSettings:
    """The TLS context and password for ``profile``: ``ca_file`` (empty: the system store)
    plus the CSMS roots installed with InstallCertificate; at profile 3 the certificate and
    key in ``cp/current``."""
    bundle = store.csms_bundle_file()
    extra = str(bundle) if bundle else None
    if profile < 3:
        return ConnectSettings(tls_context(ca_file or None, extra_ca_file=extra), password, False)
    files = store.cp_files()
    if files is None:
        raise NoCertificateError("security profile 3 needs a charge-point certificate")
    cert, key = files
    context = tls_context(ca_file or None, str(cert), str(key), extra_ca_file=extra)
    return ConnectSettings(context, None, True)
