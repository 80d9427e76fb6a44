"""The certificate store under ``<state_dir>/certs/`` (a stable interface for outside checks).

Layout (directories 0700, files 0600, whatever the umask)::

    certs/
      csms/<sha256>.pem, <sha256>.json         CentralSystemRootCertificate (+ its metadata)
      csms-fallback/<sha256>.pem, .json        roots replaced under AdditionalRootCertificateCheck,
                                               kept until a connection with the new one works
      manufacturer/<sha256>.pem, .json         ManufacturerRootCertificate
      csms-bundle.pem                          csms/ + csms-fallback/ in one file, for TLS
      cp/pending-key.pem                       key made for the last SignCertificate
      cp/current/{cert.pem,key.pem,info.json}  the charge-point certificate (chain) and its key
      cp/previous/{cert.pem,key.pem,info.json} the one before, until the new one has connected

``<sha256>`` is the SHA-256 fingerprint of the certificate's DER. The ``.json`` files hold
what :func:`agent.features.security.crypto.certificate_info` computed at install time
(the GetInstalledCertificateIds hash data, the validity dates), so listing, deleting and
``evcp status`` never need ``cryptography``.

Every file is written to a temporary name, flushed and renamed into place; a charge-point
certificate is installed as a whole directory (``cp/.new-*`` renamed to ``cp/current``,
after ``cp/current`` became ``cp/previous``). A power cut between the two renames leaves
``previous`` and no ``current``: :meth:`CertStore.recover` (run on open) puts it back.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DIR_MODE = 0o700
FILE_MODE = 0o600


class RootType(enum.StrEnum):
    """InstallCertificate / GetInstalledCertificateIds certificateType values."""

    CSMS = "CentralSystemRootCertificate"
    MANUFACTURER = "ManufacturerRootCertificate"


_DIRS = {RootType.CSMS: "csms", RootType.MANUFACTURER: "manufacturer"}
FALLBACK_DIR = "csms-fallback"
HASH_FIELDS = ("hash_algorithm", "issuer_name_hash", "issuer_key_hash", "serial_number")


class StoreError(Exception):
    """The store cannot do what was asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class Installed:
    """One installed root certificate."""

    type: RootType
    fingerprint: str
    pem: str
    info: dict[str, Any]

    @property
    def hash_data(self) -> dict[str, str]:
        """CertificateHashDataType (snake_case keys, as the ``ocpp`` library's dataclass)."""
        return {name: str(self.info[name]) for name in HASH_FIELDS}


def make_dir(path: Path) -> None:
    """Create ``path`` (and parents inside it) with mode 0700, whatever the umask."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) with ``mode``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; set it explicitly anyway
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _same_hash(a: dict[str, str], b: dict[str, str]) -> bool:
    """Hash data equality: case-insensitive hex, serial numbers without leading zeros."""
    if a.get("hash_algorithm", "").upper() != b.get("hash_algorithm", "").upper():
        return False
    for name in ("issuer_name_hash", "issuer_key_hash"):
        if a.get(name, "").lower() != b.get(name, "").lower():
            return False
    serial_a = a.get("serial_number", "").lower().lstrip("0") or "0"
    serial_b = b.get("serial_number", "").lower().lstrip("0") or "0"
    return serial_a == serial_b


class CertStore:
    """The files under ``<state_dir>/certs``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "certs"
        make_dir(self.root)
        for name in (*_DIRS.values(), FALLBACK_DIR, "cp"):
            make_dir(self.root / name)
        self.recover()

    # ------------------------------------------------------------------ roots
    def _dir(self, kind: RootType) -> Path:
        return self.root / _DIRS[kind]

    def _read(self, kind: RootType, directory: Path) -> list[Installed]:
        out = []
        for meta in sorted(directory.glob("*.json")):
            pem_path = meta.with_suffix(".pem")
            try:
                info = json.loads(meta.read_text())
                pem = pem_path.read_text()
            except (OSError, ValueError):
                continue  # half-deleted or damaged: not installed
            out.append(Installed(kind, meta.stem, pem, info))
        return out

    def roots(self, kind: RootType) -> list[Installed]:
        return self._read(kind, self._dir(kind))

    def fallback_roots(self) -> list[Installed]:
        return self._read(RootType.CSMS, self.root / FALLBACK_DIR)

    def count(self) -> int:
        """Certificates counted against CertificateStoreMaxLength (all installed roots)."""
        return sum(len(self.roots(kind)) for kind in RootType)

    def has_csms_root(self) -> bool:
        return bool(self.roots(RootType.CSMS))

    def install_root(self, kind: RootType, pem: str, info: dict[str, Any], max_length: int) -> None:
        """Install a root (``info`` from ``certificate_info``); raise :class:`StoreError`
        when the store is full. Installing one already there changes nothing."""
        fingerprint = str(info["fingerprint"])
        directory = self._dir(kind)
        if (directory / f"{fingerprint}.pem").exists():
            return
        if self.count() >= max_length:
            raise StoreError(f"the store is full (CertificateStoreMaxLength {max_length})")
        # The certificate first, its metadata last: the .json makes it installed.
        write_private(directory / f"{fingerprint}.pem", pem.encode())
        write_private(directory / f"{fingerprint}.json", json.dumps(info).encode())
        if kind is RootType.CSMS:
            self._write_bundle()

    def replace_csms_roots(self, pem: str, info: dict[str, Any]) -> None:
        """AdditionalRootCertificateCheck: the new root replaces every installed CSMS root;
        those move to ``csms-fallback/`` until :meth:`commit_roots` (after a connection
        with the new root worked) or :meth:`rollback_roots`."""
        fallback = self.root / FALLBACK_DIR
        for old in self.roots(RootType.CSMS):
            if old.fingerprint == info["fingerprint"]:
                continue
            for suffix in (".pem", ".json"):
                os.replace(
                    self._dir(RootType.CSMS) / f"{old.fingerprint}{suffix}",
                    fallback / f"{old.fingerprint}{suffix}",
                )
        _fsync_dir(fallback)
        self.install_root(RootType.CSMS, pem, info, max_length=1 << 30)

    def commit_roots(self) -> None:
        """A connection with the current CSMS roots worked: forget the fallback ones."""
        removed = False
        for path in (self.root / FALLBACK_DIR).iterdir():
            path.unlink()
            removed = True
        if removed:
            self._write_bundle()

    def rollback_roots(self) -> None:
        """The replacing root did not work: the fallback roots become the roots again."""
        fallback = self.fallback_roots()
        if not fallback:
            return
        for current in self.roots(RootType.CSMS):
            self._unlink(RootType.CSMS, current.fingerprint)
        for old in fallback:
            for suffix in (".pem", ".json"):
                os.replace(
                    self.root / FALLBACK_DIR / f"{old.fingerprint}{suffix}",
                    self._dir(RootType.CSMS) / f"{old.fingerprint}{suffix}",
                )
        self._write_bundle()

    def _unlink(self, kind: RootType, fingerprint: str) -> None:
        directory = self._dir(kind)
        (directory / f"{fingerprint}.json").unlink(missing_ok=True)  # uninstalled from here
        (directory / f"{fingerprint}.pem").unlink(missing_ok=True)

    def find(self, hash_data: dict[str, str]) -> Installed | None:
        for kind in RootType:
            for cert in self.roots(kind):
                if _same_hash(cert.hash_data, hash_data):
                    return cert
        return None

    def delete(self, hash_data: dict[str, str]) -> str:
        """DeleteCertificate: "Accepted", "NotFound", or "Failed" (the last CSMS root)."""
        cert = self.find(hash_data)
        if cert is None:
            return "NotFound"
        if cert.type is RootType.CSMS and len(self.roots(RootType.CSMS)) == 1:
            return "Failed"
        self._unlink(cert.type, cert.fingerprint)
        if cert.type is RootType.CSMS:
            self._write_bundle()
        return "Accepted"

    def hash_data(self, kind: RootType) -> list[dict[str, str]]:
        """GetInstalledCertificateIds for ``kind``."""
        return [cert.hash_data for cert in self.roots(kind)]

    @property
    def csms_bundle(self) -> Path:
        return self.root / "csms-bundle.pem"

    def csms_bundle_file(self) -> Path | None:
        """The installed CSMS roots (fallback ones included) in one PEM file, for the TLS
        context's ``load_verify_locations``; None when none is installed."""
        return self.csms_bundle if self.csms_bundle.exists() else None

    def _write_bundle(self) -> None:
        pems = [cert.pem for cert in (*self.roots(RootType.CSMS), *self.fallback_roots())]
        if pems:
            write_private(self.csms_bundle, "".join(p.rstrip() + "\n" for p in pems).encode())
        else:
            self.csms_bundle.unlink(missing_ok=True)

    # ------------------------------------------------------------------ charge-point certificate
    @property
    def cp_dir(self) -> Path:
        return self.root / "cp"

    def recover(self) -> None:
        """Finish or undo a charge-point certificate install a power cut interrupted."""
        current, previous = self.cp_dir / "current", self.cp_dir / "previous"
        for stray in self.cp_dir.glob(".new-*"):
            shutil.rmtree(stray, ignore_errors=True)
        if not (current / "info.json").exists() and (previous / "info.json").exists():
            shutil.rmtree(current, ignore_errors=True)
            os.replace(previous, current)
            _fsync_dir(self.cp_dir)

    def write_pending_key(self, key_pem: str) -> None:
        """Keep the key made for a SignCertificate (it replaces an older pending one)."""
        write_private(self.cp_dir / "pending-key.pem", key_pem.encode())

    def pending_key(self) -> str | None:
        try:
            return (self.cp_dir / "pending-key.pem").read_text()
        except FileNotFoundError:
            return None

    def install_cp(self, chain_pem: str, info: dict[str, Any]) -> None:
        """Install the signed chain with the pending key; the current one becomes
        ``previous`` (kept until :meth:`commit_cp` or :meth:`rollback_cp`)."""
        key = self.pending_key()
        if key is None:
            raise StoreError("no pending key: no SignCertificate was sent for this certificate")
        new = Path(tempfile.mkdtemp(prefix=".new-", dir=self.cp_dir))
        os.chmod(new, DIR_MODE)
        write_private(new / "cert.pem", chain_pem.encode())
        write_private(new / "key.pem", key.encode())
        write_private(new / "info.json", json.dumps(info).encode())
        current, previous = self.cp_dir / "current", self.cp_dir / "previous"
        if current.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(current, previous)
        os.replace(new, current)
        (self.cp_dir / "pending-key.pem").unlink(missing_ok=True)
        _fsync_dir(self.cp_dir)

    def cp_files(self) -> tuple[Path, Path] | None:
        """(certificate chain, private key) for the TLS client certificate, or None."""
        current = self.cp_dir / "current"
        if not (current / "info.json").exists():
            return None
        return current / "cert.pem", current / "key.pem"

    def cp_info(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.cp_dir / "current" / "info.json").read_text()))
        except (OSError, ValueError):
            return None

    def cp_not_after(self) -> datetime | None:
        info = self.cp_info()
        return datetime.fromisoformat(info["not_after"]) if info else None

    def cp_key(self) -> str | None:
        files = self.cp_files()
        return files[1].read_text() if files else None

    def has_previous_cp(self) -> bool:
        return (self.cp_dir / "previous" / "info.json").exists()

    def commit_cp(self) -> None:
        """The new certificate has connected: forget the previous one."""
        shutil.rmtree(self.cp_dir / "previous", ignore_errors=True)

    def rollback_cp(self) -> bool:
        """The new certificate did not connect: the previous one is current again."""
        current, previous = self.cp_dir / "current", self.cp_dir / "previous"
        if not (previous / "info.json").exists():
            return False
        shutil.rmtree(current, ignore_errors=True)
        os.replace(previous, current)
        _fsync_dir(self.cp_dir)
        return True
