"""The certificate store and the crypto operations, on real keys, certificates and files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.features.security import crypto
from agent.features.security.certs import CertStore, RootType, StoreError
from agent.features.security.crypto import HelperCrypto, InProcessCrypto
from tests.agent.security import pki

NOW = datetime.now(UTC)
OPENSSL = shutil.which("openssl")


@pytest.fixture
def umask_0022() -> object:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def info(pem: str) -> dict[str, object]:
    return crypto.certificate_info(pem)


# ---------------------------------------------------------------------- CSR
@pytest.mark.parametrize("algorithm", crypto.KEY_ALGORITHMS)
def test_csr_carries_cp_id_and_cpo_name_and_the_signed_certificate_fits_the_key(
    algorithm: str,
) -> None:
    root = pki.make_ca()
    key = crypto.generate_key(algorithm)
    csr = crypto.make_csr(key, "CP-1", "ACME CPO")
    assert "PRIVATE" not in csr
    cert, subject = pki.sign_csr(root, csr)
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CP-1"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ACME CPO"
    result = crypto.check_chain(pki.pem(cert), [root.pem], key, NOW.isoformat())
    assert result["ok"], result
    assert result["not_after"] == cert.not_valid_after_utc.isoformat()


def test_unknown_key_algorithm_is_refused() -> None:
    with pytest.raises(crypto.CryptoInputError, match="dsa"):
        crypto.generate_key("dsa")


# ---------------------------------------------------------------------- chain checks
def test_chain_through_an_intermediate_is_accepted_and_a_broken_order_is_not() -> None:
    root = pki.make_ca()
    sub = pki.make_ca("Sub CA", issuer=root)
    key = pki.new_key()
    leaf = pki.issue(sub, key.public_key(), x509.Name([]))
    good = pki.pem(leaf) + sub.pem
    assert crypto.check_chain(good, [root.pem], pki.key_pem(key), NOW.isoformat())["ok"]
    # Without the intermediate, the leaf does not reach the root.
    alone = crypto.check_chain(pki.pem(leaf), [root.pem], pki.key_pem(key), NOW.isoformat())
    assert not alone["ok"]
    assert "root" in alone["reason"]


def test_key_that_does_not_match_is_refused() -> None:
    root = pki.make_ca()
    cert = pki.issue(root, pki.new_key().public_key(), x509.Name([]))
    result = crypto.check_chain(
        pki.pem(cert), [root.pem], pki.key_pem(pki.new_key()), NOW.isoformat()
    )
    assert not result["ok"]
    assert "private key" in result["reason"]


def test_expired_certificate_is_refused() -> None:
    root = pki.make_ca()
    key = pki.new_key()
    cert = pki.issue(
        root,
        key.public_key(),
        x509.Name([]),
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    result = crypto.check_chain(pki.pem(cert), [root.pem], pki.key_pem(key), NOW.isoformat())
    assert not result["ok"]
    assert "expired" in result["reason"]


def test_certificate_from_another_root_is_refused() -> None:
    key = pki.new_key()
    cert = pki.issue(pki.make_ca("Other"), key.public_key(), x509.Name([]))
    result = crypto.check_chain(
        pki.pem(cert), [pki.make_ca().pem], pki.key_pem(key), NOW.isoformat()
    )
    assert not result["ok"]


def test_garbage_is_a_clear_refusal_not_a_crash() -> None:
    result = crypto.check_chain("not a cert", [], pki.key_pem(pki.new_key()), NOW.isoformat())
    assert not result["ok"]
    assert "PEM" in result["reason"] or "certificate" in result["reason"]
    assert crypto.check_root("-----BEGIN CERTIFICATE-----\nAAAA\n", NOW.isoformat())


def test_check_root_wants_a_valid_ca_certificate() -> None:
    root = pki.make_ca()
    assert crypto.check_root(root.pem, NOW.isoformat()) is None
    leaf = pki.issue(root, pki.new_key().public_key(), x509.Name([]))
    assert "CA" in (crypto.check_root(pki.pem(leaf), NOW.isoformat()) or "")
    old = pki.make_ca(not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(days=1))
    assert "expired" in (crypto.check_root(old.pem, NOW.isoformat()) or "")


# ---------------------------------------------------------------------- hash data
def _openssl(*args: str, data: bytes | None = None) -> bytes:
    assert OPENSSL
    return subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=True).stdout


def _asn1_items(der: bytes) -> list[tuple[int, int, int, int, str]]:
    """``openssl asn1parse`` of DER: (offset, depth, header length, length, type)."""
    out = _openssl("asn1parse", "-inform", "DER", data=der).decode()
    items = []
    for line in out.splitlines():
        match = re.match(r"\s*(\d+):d=(\d+)\s+hl=(\d+)\s+l=\s*(\d+)\s+\w+:\s*(.*)", line)
        if match:
            off, depth, hl, length, kind = match.groups()
            items.append((int(off), int(depth), int(hl), int(length), kind.strip()))
    return items


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_hash_data_matches_openssl(kind: str, tmp_path: Path) -> None:
    root = pki.make_ca(kind=kind)
    sub = pki.make_ca("Sub", issuer=root, kind=kind)
    for cert, issuer in ((root, root), (sub, root)):
        data = crypto.certificate_info(cert.pem, issuer.pem)
        der = _openssl("x509", "-outform", "DER", data=cert.pem.encode())
        # issuer Name: the 4th child of tbsCertificate (after [0] version, serial, sigAlg).
        tbs = [i for i in _asn1_items(der) if i[1] == 2]
        off, _d, hl, length, _k = tbs[3]
        issuer_der = der[off : off + hl + length]
        assert data["issuer_name_hash"] == hashlib.sha256(issuer_der).hexdigest()
        # issuer key: the BIT STRING of the issuer's SubjectPublicKeyInfo, less its pad byte.
        spki = _openssl("x509", "-noout", "-pubkey", data=issuer.pem.encode())
        spki_der = _openssl("pkey", "-pubin", "-outform", "DER", data=spki)
        bits = next(i for i in _asn1_items(spki_der) if i[4] == "BIT STRING" and i[1] == 1)
        off, _d, hl, length, _k = bits
        key_bits = spki_der[off + hl + 1 : off + hl + length]
        assert data["issuer_key_hash"] == hashlib.sha256(key_bits).hexdigest()
        serial = _openssl("x509", "-noout", "-serial", data=cert.pem.encode()).decode()
        expected = serial.strip().split("=", 1)[1].lstrip("0").lower()
        assert data["serial_number"] == expected
        assert data["hash_algorithm"] == "SHA256"


def test_serial_number_has_no_leading_zeros() -> None:
    root = pki.make_ca()
    cert = pki.issue(root, pki.new_key().public_key(), x509.Name([]), serial=0x00AB)
    assert crypto.certificate_info(pki.pem(cert), root.pem)["serial_number"] == "ab"


# ---------------------------------------------------------------------- the store
def test_store_files_and_dirs_are_private_under_umask_0022(
    tmp_path: Path, umask_0022: object
) -> None:
    store = CertStore(tmp_path)
    root = pki.make_ca()
    store.install_root(RootType.CSMS, root.pem, info(root.pem), 10)
    store.write_pending_key(crypto.generate_key("ec-p256"))
    key = store.pending_key()
    assert key is not None
    cert, _ = pki.sign_csr(root, crypto.make_csr(key, "CP", ""))
    store.install_cp(pki.pem(cert), info(pki.pem(cert)))
    for path in [tmp_path / "certs", *(tmp_path / "certs").rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, path
    files = store.cp_files()
    assert files is not None
    assert files[1].read_text() == key
    assert not (tmp_path / "certs" / "cp" / "pending-key.pem").exists()


def test_last_csms_root_cannot_be_deleted_but_a_second_one_can(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    first, second = pki.make_ca("A"), pki.make_ca("B")
    store.install_root(RootType.CSMS, first.pem, info(first.pem), 10)
    only = store.hash_data(RootType.CSMS)[0]
    assert store.delete(only) == "Failed"
    assert store.has_csms_root()
    store.install_root(RootType.CSMS, second.pem, info(second.pem), 10)
    assert store.delete(only) == "Accepted"
    assert [c.pem for c in store.roots(RootType.CSMS)] == [second.pem]
    assert store.csms_bundle.read_text().strip() == second.pem.strip()
    assert store.delete(only) == "NotFound"


def test_manufacturer_roots_can_all_be_deleted(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    root = pki.make_ca()
    store.install_root(RootType.MANUFACTURER, root.pem, info(root.pem), 10)
    (data,) = store.hash_data(RootType.MANUFACTURER)
    upper = {**data, "issuer_name_hash": data["issuer_name_hash"].upper()}
    assert store.delete(upper) == "Accepted"
    assert store.hash_data(RootType.MANUFACTURER) == []


def test_store_max_length_counts_every_root(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    a, b, c = pki.make_ca("A"), pki.make_ca("B"), pki.make_ca("C")
    store.install_root(RootType.CSMS, a.pem, info(a.pem), 2)
    store.install_root(RootType.MANUFACTURER, b.pem, info(b.pem), 2)
    store.install_root(RootType.MANUFACTURER, b.pem, info(b.pem), 2)  # again: no change
    with pytest.raises(StoreError, match="full"):
        store.install_root(RootType.CSMS, c.pem, info(c.pem), 2)
    assert store.count() == 2


def test_new_cp_certificate_keeps_the_old_until_committed_or_rolled_back(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    root = pki.make_ca()

    def new_cert(days: int) -> str:
        store.write_pending_key(crypto.generate_key("ec-p256"))
        key = store.pending_key()
        assert key
        cert, _ = pki.sign_csr(
            root, crypto.make_csr(key, "CP", ""), not_after=NOW + timedelta(days=days)
        )
        text = pki.pem(cert)
        store.install_cp(text, info(text))
        return text

    first = new_cert(10)
    first_key = store.cp_key()
    second = new_cert(20)
    assert store.has_previous_cp()
    assert store.rollback_cp()
    files = store.cp_files()
    assert files and files[0].read_text() == first and store.cp_key() == first_key
    assert not store.has_previous_cp()
    second = new_cert(20)
    store.commit_cp()
    assert not store.has_previous_cp()
    files = store.cp_files()
    assert files and files[0].read_text() == second
    not_after = store.cp_not_after()
    assert not_after is not None and not_after > NOW + timedelta(days=19)


def test_power_cut_between_the_two_renames_is_recovered_on_open(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    root = pki.make_ca()
    store.write_pending_key(crypto.generate_key("ec-p256"))
    key = store.pending_key()
    assert key
    cert, _ = pki.sign_csr(root, crypto.make_csr(key, "CP", ""))
    store.install_cp(pki.pem(cert), info(pki.pem(cert)))
    cp = tmp_path / "certs" / "cp"
    # The state a cut leaves after "current -> previous" and before ".new -> current".
    os.replace(cp / "current", cp / "previous")
    (cp / ".new-x").mkdir()
    (cp / ".new-x" / "cert.pem").write_text("half")
    reopened = CertStore(tmp_path)
    files = reopened.cp_files()
    assert files and files[0].read_text() == pki.pem(cert)
    assert not (cp / ".new-x").exists()


# ---------------------------------------------------------------------- signed firmware
@pytest.fixture
def firmware(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(os.urandom(200_000))
    return path


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_signed_firmware_good_signature(kind: str, firmware: Path) -> None:
    root = pki.make_ca(kind=kind)
    key = pki.new_key(kind)
    signer = pki.issue(root, key.public_key(), x509.Name([]), client=False)
    result = crypto.verify_firmware(
        str(firmware), pki.sign_file(key, firmware), pki.pem(signer), [root.pem], NOW.isoformat()
    )
    assert result == {"status": "SignatureVerified", "reason": ""}


def test_signed_firmware_bad_signature(firmware: Path, tmp_path: Path) -> None:
    root = pki.make_ca()
    key = pki.new_key()
    signer = pki.issue(root, key.public_key(), x509.Name([]), client=False)
    signature = pki.sign_file(key, firmware)
    tampered = tmp_path / "tampered.bin"
    data = bytearray(firmware.read_bytes())
    data[1000] ^= 1
    tampered.write_bytes(bytes(data))
    result = crypto.verify_firmware(
        str(tampered), signature, pki.pem(signer), [root.pem], NOW.isoformat()
    )
    assert result["status"] == "InvalidSignature"
    garbage = crypto.verify_firmware(
        str(firmware), "%%%", pki.pem(signer), [root.pem], NOW.isoformat()
    )
    assert garbage["status"] == "InvalidSignature"


def test_signed_firmware_certificate_from_another_root(firmware: Path) -> None:
    other = pki.make_ca("Other")
    key = pki.new_key()
    signer = pki.issue(other, key.public_key(), x509.Name([]), client=False)
    result = crypto.verify_firmware(
        str(firmware),
        pki.sign_file(key, firmware),
        pki.pem(signer),
        [pki.make_ca().pem],
        NOW.isoformat(),
    )
    assert result["status"] == "InvalidCertificate"


# ---------------------------------------------------------------------- back-ends
def test_helper_process_gives_the_same_answers_and_clear_errors(firmware: Path) -> None:
    helper, local = HelperCrypto(), InProcessCrypto()
    root = pki.make_ca()
    assert helper.run("certificate_info", pem=root.pem) == local.run(
        "certificate_info", pem=root.pem
    )
    key = helper.run("generate_key", algorithm="ec-p256")
    assert "PRIVATE KEY" in key
    with pytest.raises(crypto.CryptoInputError, match="not a PEM certificate"):
        helper.run("certificate_info", pem="nonsense")
