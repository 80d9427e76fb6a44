"""Everything that needs ``cryptography``: keys, CSRs, certificate checks, firmware signatures.

``cryptography`` costs several MiB of resident memory once imported (see
``bench/bench_security_crypto.py``), and the agent needs it only for a CSR, a
CertificateSigned or InstallCertificate check and a signed firmware: a few times a year. So
this module never imports it at module level, and :class:`HelperCrypto` runs every operation
in a short-lived child process (``python -m agent.features.security.crypto``, JSON on
stdin/stdout): the charging agent's resident set never grows. :class:`InProcessCrypto`
runs the same functions in the calling process (tests, the CLI, tools).

Every function takes and returns JSON values (str, int, bool, dict), so both run the same.
Bad input (not PEM, not a certificate) raises :class:`CryptoInputError` with a clear message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.features.security.backend import (
    INVALID_CERTIFICATE,
    INVALID_SIGNATURE,
    SIGNATURE_VERIFIED,
    CryptoInputError,
    HelperCrypto,
)

#: Re-exported: tools and tests take both back-ends from here.
__all__ = ["OPERATIONS", "CryptoInputError", "HelperCrypto", "InProcessCrypto"]

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes


#: Key algorithms the charger can generate for its certificate.
KEY_ALGORITHMS = ("ec-p256", "rsa-2048")


# ---------------------------------------------------------------------- helpers
def _certs(pem: str, what: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise CryptoInputError(f"{what}: not a PEM certificate ({exc})") from None
    if not certs:
        raise CryptoInputError(f"{what}: no certificate found")
    return certs


def _cert(pem: str, what: str) -> x509.Certificate:
    certs = _certs(pem, what)
    if len(certs) != 1:
        raise CryptoInputError(f"{what}: {len(certs)} certificates where one was expected")
    return certs[0]


def _key(pem: str) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoInputError(f"private key: cannot be loaded ({exc})") from None


def _spki_der(key: PublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER item at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return tag, pos, pos + length


def public_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey BIT STRING's bits (without the unused-bits octet) of a DER
    SubjectPublicKeyInfo: what issuerKeyHash hashes (as OCSP's issuerKeyHash, RFC 6960)."""
    tag, start, _end = _der_item(spki_der, 0)
    if tag != 0x30:
        raise CryptoInputError("public key: not a DER SubjectPublicKeyInfo")
    _tag, _s, algorithm_end = _der_item(spki_der, start)
    tag, bits_start, bits_end = _der_item(spki_der, algorithm_end)
    if tag != 0x03:
        raise CryptoInputError("public key: no BIT STRING in SubjectPublicKeyInfo")
    return spki_der[bits_start + 1 : bits_end]


def _when(cert: x509.Certificate) -> tuple[datetime, datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _verified(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    return _spki_der(a) == _spki_der(b)


def _expiry_problem(cert: x509.Certificate, now: datetime, what: str) -> str | None:
    not_before, not_after = _when(cert)
    if now < not_before:
        return f"{what} is not valid before {not_before.isoformat()}"
    if now > not_after:
        return f"{what} expired on {not_after.isoformat()}"
    return None


# ---------------------------------------------------------------------- operations
def generate_key(algorithm: str) -> str:
    """A new private key (PEM, PKCS#8), made here and never sent anywhere."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if algorithm == "ec-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "rsa-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise CryptoInputError(f"key algorithm {algorithm!r}: expected one of {KEY_ALGORITHMS}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def make_csr(key_pem: str, common_name: str, organization: str) -> str:
    """A PEM CSR for ``key_pem``: subject CN = charge point id, O = CpoName, SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = _key(key_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CryptoInputError("private key: only EC and RSA keys can sign a CSR here")
    if not common_name:
        raise CryptoInputError("CSR: the charge point id (CN) is empty")
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.PEM).decode("ascii")


def certificate_info(pem: str, issuer_pem: str = "") -> dict[str, Any]:
    """What the store keeps about a certificate, hash data as the whitepaper defines it:
    SHA-256 of the DER issuer name, SHA-256 of the issuer's public key bits (the issuer is
    ``issuer_pem``, or the certificate itself when it is self-issued or no issuer is
    given), and the serial number in hex without leading zeros."""
    cert = _cert(pem, "certificate")
    issuer = _cert(issuer_pem, "issuer certificate") if issuer_pem else cert
    from cryptography.hazmat.primitives.serialization import Encoding

    not_before, not_after = _when(cert)
    return {
        "hash_algorithm": "SHA256",
        "issuer_name_hash": hashlib.sha256(cert.issuer.public_bytes()).hexdigest(),
        "issuer_key_hash": hashlib.sha256(
            public_key_bits(_spki_der(issuer.public_key()))
        ).hexdigest(),
        "serial_number": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "self_issued": cert.issuer == cert.subject,
        "is_ca": _is_ca(cert),
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "fingerprint": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }


def check_root(pem: str, now: str) -> str | None:
    """InstallCertificate: None when ``pem`` is one valid CA certificate, else the reason."""
    try:
        cert = _cert(pem, "certificate")
    except CryptoInputError as exc:
        return str(exc)
    if not _is_ca(cert):
        return "not a CA certificate (basicConstraints CA is not set)"
    return _expiry_problem(cert, datetime.fromisoformat(now), "certificate")


def signed_by(pem: str, issuer_pem: str) -> bool:
    """Is ``pem``'s signature made by ``issuer_pem``'s key (AdditionalRootCertificateCheck)?"""
    return _verified(_cert(pem, "certificate"), _cert(issuer_pem, "issuer certificate"))


def _chain_to_root(
    chain: list[x509.Certificate], roots: list[x509.Certificate], now: datetime, what: str
) -> str | None:
    """None when every certificate of ``chain`` (leaf first) is valid at ``now``, signed by
    the next one, and the last one is, or is signed by, one of ``roots``."""
    for index, cert in enumerate(chain):
        problem = _expiry_problem(cert, now, what if index == 0 else f"chain certificate {index}")
        if problem:
            return problem
        if index > 0 and not _is_ca(cert):
            return f"chain certificate {index} is not a CA certificate"
        if index + 1 < len(chain) and not _verified(cert, chain[index + 1]):
            return f"chain certificate {index} is not signed by certificate {index + 1}"
    last = chain[-1]
    for root in roots:
        if root == last or (root.subject == last.issuer and _verified(last, root)):
            root_problem = _expiry_problem(root, now, "root certificate")
            if root_problem is None:
                return None
    return f"{what} does not chain to an installed root certificate"


def check_chain(chain_pem: str, roots_pem: list[str], key_pem: str, now: str) -> dict[str, Any]:
    """CertificateSigned: ``{"ok": bool, "reason": str, "leaf": str, "not_after": ISO}``.

    The chain (leaf first, PEM concatenated) must chain to one of ``roots_pem`` (the
    installed CSMS roots), be valid now, and the leaf's public key must be ``key_pem``'s.
    """
    moment = datetime.fromisoformat(now)
    try:
        chain = _certs(chain_pem, "certificate chain")
        key = _key(key_pem)
        roots = [cert for pem in roots_pem for cert in _certs(pem, "root certificate")]
    except CryptoInputError as exc:
        return {"ok": False, "reason": str(exc)}
    leaf = chain[0]
    if not _same_public_key(leaf.public_key(), key.public_key()):
        return {"ok": False, "reason": "the certificate is not for the charger's private key"}
    problem = _chain_to_root(chain, roots, moment, "certificate")
    if problem:
        return {"ok": False, "reason": problem}
    from cryptography.hazmat.primitives.serialization import Encoding

    return {
        "ok": True,
        "reason": "",
        "leaf": leaf.public_bytes(Encoding.PEM).decode("ascii"),
        "not_after": leaf.not_valid_after_utc.isoformat(),
    }


def check_signing_certificate(pem: str, roots_pem: list[str], now: str) -> str | None:
    """SignedUpdateFirmware.req: None when the signing certificate (intermediates may
    follow it) chains to one of ``roots_pem`` (manufacturer roots) and is valid now."""
    try:
        chain = _certs(pem, "signing certificate")
        roots = [cert for text in roots_pem for cert in _certs(text, "manufacturer root")]
    except CryptoInputError as exc:
        return str(exc)
    return _chain_to_root(chain, roots, datetime.fromisoformat(now), "signing certificate")


#: SignedFirmwareStatusNotification / verification results.


def verify_firmware(
    path: str, signature_b64: str, signing_cert_pem: str, roots_pem: list[str], now: str
) -> dict[str, str]:
    """SignedUpdateFirmware: ``{"status": ..., "reason": ...}``.

    The signing certificate (PEM; intermediates may follow it) must chain to an installed
    ManufacturerRootCertificate and be valid now (else InvalidCertificate); the base64
    ``signature`` must be its key's SHA-256 signature (RSA PKCS#1 v1.5 or ECDSA) over the
    file's bytes (else InvalidSignature). The file is hashed in 64 KiB reads.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    try:
        chain = _certs(signing_cert_pem, "signing certificate")
        roots = [cert for pem in roots_pem for cert in _certs(pem, "manufacturer root")]
    except CryptoInputError as exc:
        return {"status": INVALID_CERTIFICATE, "reason": str(exc)}
    problem = _chain_to_root(chain, roots, datetime.fromisoformat(now), "signing certificate")
    if problem:
        return {"status": INVALID_CERTIFICATE, "reason": problem}
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        return {"status": INVALID_SIGNATURE, "reason": "the signature is not base64"}
    digest = hashes.Hash(hashes.SHA256())
    with open(path, "rb") as firmware:
        while block := firmware.read(65536):
            digest.update(block)
    hashed = digest.finalize()
    key = chain[0].public_key()
    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, hashed, padding.PKCS1v15(), prehashed)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, hashed, ec.ECDSA(prehashed))
        else:
            return {"status": INVALID_CERTIFICATE, "reason": "signing key is not RSA or EC"}
    except InvalidSignature:
        return {"status": INVALID_SIGNATURE, "reason": "the signature does not match the file"}
    return {"status": SIGNATURE_VERIFIED, "reason": ""}


OPERATIONS: dict[str, Callable[..., Any]] = {
    "generate_key": generate_key,
    "make_csr": make_csr,
    "certificate_info": certificate_info,
    "check_root": check_root,
    "signed_by": signed_by,
    "check_chain": check_chain,
    "verify_firmware": verify_firmware,
    "check_signing_certificate": check_signing_certificate,
}


class InProcessCrypto:
    """Run the operations in this process (imports ``cryptography`` on first use)."""

    def run(self, op: str, **args: Any) -> Any:
        return OPERATIONS[op](**args)


def main() -> int:
    """The helper: one JSON request on stdin, one JSON answer on stdout."""
    request = json.load(sys.stdin)
    try:
        result = OPERATIONS[request["op"]](**request["args"])
    except CryptoInputError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
    else:
        json.dump({"result": result}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
