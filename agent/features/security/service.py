"""The logic behind the OCPP 1.6 security extensions, reached through a narrow port.

Each OCPP request has a method returning the status string of its .conf; work that needs
a CALL or a reconnect is a separate ``async`` method the handler's ``@after`` runs (handlers
answer at once and never await a CALL):

====================================  ===============================================
CSMS request                          handler / after
====================================  ===============================================
ExtendedTriggerMessage(SignCP...)     :meth:`trigger_sign_certificate` / :meth:`send_sign_certificate`
CertificateSigned                     :meth:`certificate_signed` / :meth:`after_certificate_signed`
InstallCertificate                    :meth:`install_certificate`
GetInstalledCertificateIds            :meth:`get_installed_certificate_ids`
DeleteCertificate                     :meth:`delete_certificate`
ChangeConfiguration(SecurityProfile)  :meth:`change_security_profile` / :meth:`apply_security_profile`
SignedUpdateFirmware                  :meth:`accept_signed_update`, after download :meth:`verify_firmware`
GetLog(SecurityLog)                   :meth:`security_log_file` (uploaded like GetDiagnostics)
====================================  ===============================================

Certificate work runs in ``crypto`` (by default a helper process, so ``cryptography`` stays
out of the agent's memory) on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent.config import Config
from agent.core.security import (
    EventType,
    Prerequisites,
    ProfileDecision,
    profile_change,
    renewal_due,
)
from agent.features.security.backend import (
    INVALID_CERTIFICATE,
    INVALID_SIGNATURE,
    Crypto,
    CryptoInputError,
    HelperCrypto,
)
from agent.features.security.certs import CertStore, RootType, StoreError
from agent.features.security.events import SecurityEvents, SecurityLog

log = logging.getLogger("evcp.security")

#: How long to wait between two SignCertificate attempts of the charger's own.
RENEWAL_RETRY_S = 24 * 3600


class SessionPort(Protocol):
    """What the service needs from the OCPP session."""

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a CALL now and return the CALLRESULT payload; raise when it fails."""
        ...

    def enqueue_durable(self, action: str, payload: dict[str, Any]) -> None:
        """Queue a CALL like a transaction message (stored, sent in order, retried)."""
        ...

    async def reconnect(self, profile: int) -> bool:
        """Drop the connection and connect with ``profile`` (3: the client certificate in
        the store's ``cp/current``); True once connected and accepted."""
        ...

    def now(self) -> datetime:
        """The charger's clock (UTC, aware)."""
        ...


class KeyValues(Protocol):
    """The OCPP configuration keys (``agent.core.config_keys.ConfigKeys`` fits)."""

    def raw(self, name: str) -> str: ...

    def set(self, key: str, value: str) -> None: ...


class SecurityService:
    """Certificates, security profile, signed firmware and the security log.

    Args:
        charge_point_id: the CSR's CN.
        password_configured: a Basic Auth password exists besides AuthorizationKey
            (``[csms] password``), which counts as the AuthorizationKey for profile 2.
        configured_ca: a CSMS root is configured outside the store (``[csms] ca_file``).
        reconnect_bound_s: how long a reconnect with a new profile or certificate may take
            before the agent goes back to the one that worked.
        key_algorithm: "ec-p256" (default) or "rsa-2048", for the charger's new keys.
    """

    def __init__(
        self,
        *,
        store: CertStore,
        events: SecurityEvents,
        crypto: Crypto,
        keys: KeyValues,
        port: SessionPort,
        charge_point_id: str,
        password_configured: bool = False,
        configured_ca: bool = False,
        reconnect_bound_s: float = 60.0,
        key_algorithm: str = "ec-p256",
    ) -> None:
        self.store = store
        self.events = events
        self.crypto = crypto
        self.keys = keys
        self.port = port
        self.charge_point_id = charge_point_id
        self.password_configured = password_configured
        self.configured_ca = configured_ca
        self.reconnect_bound_s = reconnect_bound_s
        self.key_algorithm = key_algorithm
        self._profile_change: tuple[int, int] | None = None
        self._new_cp_certificate = False
        self._last_renewal: datetime | None = None
        self._failures_reported: set[EventType] = set()

    async def _run(self, op: str, **args: Any) -> Any:
        return await asyncio.to_thread(self.crypto.run, op, **args)

    def _event(self, event: EventType, info: str = "") -> None:
        self.events.raise_event(event, self.port.now(), info)

    def started(self) -> None:
        """The agent started (StartupOfTheDevice)."""
        self._event(EventType.STARTUP_OF_THE_DEVICE)

    def raise_event(self, event: EventType, info: str = "") -> None:
        """A security event another part of the agent saw (a Reset, a firmware update,
        a refused message, a clock change)."""
        self._event(event, info)

    @property
    def profile(self) -> int:
        return int(self.keys.raw("SecurityProfile"))

    # ------------------------------------------------------------------ status
    def snapshot(self) -> dict[str, Any]:
        """``evcp status --json``'s ``"security"`` object."""
        not_after = self.store.cp_not_after()
        return {
            "profile": self.profile,
            "cp_certificate_expires": not_after.isoformat() if not_after else None,
        }

    # ------------------------------------------------------------------ SignCertificate
    def trigger_sign_certificate(self) -> str:
        """ExtendedTriggerMessage(SignChargePointCertificate): Accepted; then run
        :meth:`send_sign_certificate` after the .conf."""
        return "Accepted"

    async def send_sign_certificate(self) -> str:
        """Make a key on the charger, keep it, send its CSR: the CSMS's status (or
        "Failed" when the CALL did not get an answer)."""
        self._last_renewal = self.port.now()
        try:
            key = str(await self._run("generate_key", algorithm=self.key_algorithm))
            csr = str(
                await self._run(
                    "make_csr",
                    key_pem=key,
                    common_name=self.charge_point_id,
                    organization=self.keys.raw("CpoName"),
                )
            )
            self.store.write_pending_key(key)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            log.error("cannot make a key and CSR for SignCertificate: %s", exc)
            return "Failed"
        try:
            answer = await self.port.call("SignCertificate", {"csr": csr})
        except Exception as exc:
            log.warning("SignCertificate got no answer: %s", exc)
            return "Failed"
        status = str(answer.get("status", ""))
        log.info("SignCertificate: %s", status)
        return status

    async def check_renewal(self) -> bool:
        """Send a SignCertificate of our own when the certificate expires soon (run at
        every connect and then daily). True when one was sent."""
        due = renewal_due(
            not_after=self.store.cp_not_after(),
            now=self.port.now(),
            renew_days=int(self.keys.raw("CertificateRenewalDays")),
            last_attempt=self._last_renewal,
            retry_s=RENEWAL_RETRY_S,
        )
        if due:
            await self.send_sign_certificate()
        return due

    # ------------------------------------------------------------------ CertificateSigned
    async def certificate_signed(self, certificate_chain: str) -> str:
        """CertificateSigned.req: "Accepted" (installed) or "Rejected"."""
        limit = int(self.keys.raw("CertificateSignedMaxChainSize"))
        if len(certificate_chain) > limit:
            self._event(
                EventType.INVALID_CHARGE_POINT_CERTIFICATE,
                f"chain of {len(certificate_chain)} characters exceeds"
                f" CertificateSignedMaxChainSize {limit}",
            )
            return "Rejected"
        key = self.store.pending_key()
        if key is None:
            self._event(EventType.INVALID_CHARGE_POINT_CERTIFICATE, "no SignCertificate pending")
            return "Rejected"
        roots = [cert.pem for cert in self.store.roots(RootType.CSMS)]
        result = await self._run(
            "check_chain",
            chain_pem=certificate_chain,
            roots_pem=roots,
            key_pem=key,
            now=self.port.now().isoformat(),
        )
        if not result["ok"]:
            self._event(EventType.INVALID_CHARGE_POINT_CERTIFICATE, result["reason"])
            return "Rejected"
        info = await self._run("certificate_info", pem=result["leaf"])
        try:
            self.store.install_cp(certificate_chain, info)
        except (OSError, StoreError) as exc:
            log.error("cannot install the charge-point certificate: %s", exc)
            return "Rejected"
        self._new_cp_certificate = True
        self._last_renewal = None  # that attempt is over: the new one's expiry decides
        return "Accepted"

    async def after_certificate_signed(self) -> bool:
        """After CertificateSigned.conf(Accepted): with profile 3, reconnect with the new
        certificate; if that fails within the bound, go back to the previous one and
        report it. Below profile 3 the previous certificate is dropped at once. True when
        the new certificate is the one in use."""
        if not self._new_cp_certificate:
            return False
        self._new_cp_certificate = False
        if self.profile < 3:
            self.store.commit_cp()
            return True
        if await self._reconnect(3):
            self.store.commit_cp()
            return True
        self.store.rollback_cp()
        self._event(
            EventType.INVALID_CHARGE_POINT_CERTIFICATE,
            "the new charge-point certificate did not connect; the previous one is back",
        )
        await self._reconnect(3)
        return False

    async def _reconnect(self, profile: int) -> bool:
        try:
            return await asyncio.wait_for(self.port.reconnect(profile), self.reconnect_bound_s)
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ roots
    async def install_certificate(self, certificate_type: str, certificate: str) -> str:
        """InstallCertificate.req: "Accepted", "Rejected" (invalid, store full, or not
        signed by the current root under AdditionalRootCertificateCheck) or "Failed"."""
        try:
            kind = RootType(certificate_type)
        except ValueError:
            return "Rejected"
        problem = await self._run("check_root", pem=certificate, now=self.port.now().isoformat())
        if problem:
            log.warning("InstallCertificate %s rejected: %s", kind.value, problem)
            if kind is RootType.CSMS:
                self._event(EventType.INVALID_CENTRAL_SYSTEM_CERTIFICATE, problem)
            return "Rejected"
        info = await self._info_with_issuer(certificate)
        check = self.keys.raw("AdditionalRootCertificateCheck") == "true"
        try:
            if kind is RootType.CSMS and check and self.store.has_csms_root():
                olds = self.store.roots(RootType.CSMS)
                signed = [
                    await self._run("signed_by", pem=certificate, issuer_pem=old.pem)
                    for old in olds
                ]
                if not any(signed):
                    self._event(
                        EventType.INVALID_CENTRAL_SYSTEM_CERTIFICATE,
                        "new CSMS root is not signed by the installed one",
                    )
                    return "Rejected"
                self.store.replace_csms_roots(certificate, info)
            else:
                self.store.install_root(
                    kind, certificate, info, int(self.keys.raw("CertificateStoreMaxLength"))
                )
        except StoreError as exc:
            log.warning("InstallCertificate %s rejected: %s", kind.value, exc)
            return "Rejected"
        except OSError as exc:
            log.error("InstallCertificate %s failed: %s", kind.value, exc)
            return "Failed"
        return "Accepted"

    async def _info_with_issuer(self, pem: str) -> dict[str, Any]:
        """certificate_info, with issuerKeyHash from the installed certificate that signed
        ``pem`` when it is not self-issued (else its own key, the only one known)."""
        info: dict[str, Any] = await self._run("certificate_info", pem=pem)
        if info["self_issued"]:
            return info
        for kind in RootType:
            for cert in self.store.roots(kind):
                if cert.info.get("subject") == info["issuer"] and await self._run(
                    "signed_by", pem=pem, issuer_pem=cert.pem
                ):
                    issued: dict[str, Any] = await self._run(
                        "certificate_info", pem=pem, issuer_pem=cert.pem
                    )
                    return issued
        return info

    def get_installed_certificate_ids(
        self, certificate_type: str
    ) -> tuple[str, list[dict[str, str]]]:
        """GetInstalledCertificateIds.req: ("Accepted", hash data) or ("NotFound", [])."""
        try:
            kind = RootType(certificate_type)
        except ValueError:
            return "NotFound", []
        data = self.store.hash_data(kind)
        return ("Accepted", data) if data else ("NotFound", [])

    def delete_certificate(self, hash_data: dict[str, str]) -> str:
        """DeleteCertificate.req: "Accepted", "NotFound" or "Failed" (last CSMS root)."""
        try:
            return self.store.delete(hash_data)
        except OSError as exc:
            log.error("DeleteCertificate failed: %s", exc)
            return "Failed"

    # ------------------------------------------------------------------ SecurityProfile
    def _prerequisites(self) -> Prerequisites:
        not_after = self.store.cp_not_after()
        info = self.store.cp_info() or {}
        now = self.port.now()
        valid = (
            not_after is not None
            and now < not_after
            and now >= datetime.fromisoformat(info.get("not_before", now.isoformat()))
        )
        return Prerequisites(
            authorization_key=bool(self.keys.raw("AuthorizationKey")) or self.password_configured,
            csms_root=self.store.has_csms_root() or self.configured_ca,
            valid_cp_certificate=valid,
        )

    def change_security_profile(self, value: str) -> str:
        """ChangeConfiguration(SecurityProfile): "Accepted" or "Rejected". When a change
        was accepted, run :meth:`apply_security_profile` after the .conf."""
        try:
            requested = int(value.strip(), 10)
        except ValueError:
            return "Rejected"
        current = self.profile
        decision = profile_change(current, requested, self._prerequisites())
        log.info("SecurityProfile %d -> %d: %s", current, requested, decision.value)
        if decision is ProfileDecision.ACCEPTED:
            self._profile_change = (current, requested)
        return "Accepted" if decision.accepted else "Rejected"

    async def apply_security_profile(self) -> bool:
        """Reconnect with the accepted profile; keep it (persisted) once connected within
        the bound, else reconnect with the old one and report the fallback. True when the
        new profile is in use."""
        if self._profile_change is None:
            return False
        old, new = self._profile_change
        self._profile_change = None
        if await self._reconnect(new):
            self.keys.set("SecurityProfile", str(new))
            if new == 3:
                self.store.commit_cp()
            self._event(
                EventType.RECONFIGURATION_OF_SECURITY_PARAMETERS, f"SecurityProfile {old} -> {new}"
            )
            return True
        log.warning("SecurityProfile %d did not connect; back to %d", new, old)
        await self._reconnect(old)
        self._event(
            EventType.RECONFIGURATION_OF_SECURITY_PARAMETERS,
            f"SecurityProfile {new} did not connect within {self.reconnect_bound_s:g} s;"
            f" back to {old}",
        )
        return False

    # ------------------------------------------------------------------ connection
    def connect_failed(self, event: EventType | None, info: str) -> None:
        """A connect attempt failed (``event`` from ``transport.security_event``): raise
        the event, once per kind until the next successful connect (a retry loop would
        otherwise fill the log)."""
        if event is None or event in self._failures_reported:
            return
        self._failures_reported.add(event)
        self._event(event, info)

    async def on_connected(self) -> None:
        """Run at every successful connect: the CSMS roots in use work (drop fallbacks),
        send the non-critical events kept meanwhile, check the certificate's expiry."""
        self._failures_reported.clear()
        self.store.commit_roots()
        for payload in self.events.take_pending():
            try:
                await self.port.call("SecurityEventNotification", payload)
            except Exception as exc:
                log.warning("SecurityEventNotification not sent: %s", exc)
                break
        await self.check_renewal()

    # ------------------------------------------------------------------ signed firmware
    async def accept_signed_update(self, signing_certificate: str) -> str:
        """SignedUpdateFirmware.req: "Accepted", or "InvalidCertificate" (and its event)
        when the signing certificate does not chain to an installed manufacturer root."""
        roots = [cert.pem for cert in self.store.roots(RootType.MANUFACTURER)]
        problem = await self._run(
            "check_signing_certificate",
            pem=signing_certificate,
            roots_pem=roots,
            now=self.port.now().isoformat(),
        )
        if problem:
            self._event(EventType.INVALID_FIRMWARE_SIGNING_CERTIFICATE, problem)
            return "InvalidCertificate"
        return "Accepted"

    async def verify_firmware(self, path: Path, signature: str, signing_certificate: str) -> str:
        """The downloaded firmware, before install: "SignatureVerified", "InvalidSignature"
        or "InvalidCertificate" (as SignedFirmwareStatusNotification statuses), with the
        security event of each failure. Only a verified file may be installed."""
        roots = [cert.pem for cert in self.store.roots(RootType.MANUFACTURER)]
        try:
            result = await self._run(
                "verify_firmware",
                path=str(path),
                signature_b64=signature,
                signing_cert_pem=signing_certificate,
                roots_pem=roots,
                now=self.port.now().isoformat(),
            )
        except (CryptoInputError, OSError) as exc:
            result = {"status": INVALID_SIGNATURE, "reason": str(exc)}
        status = str(result["status"])
        if status == INVALID_CERTIFICATE:
            self._event(EventType.INVALID_FIRMWARE_SIGNING_CERTIFICATE, result["reason"])
        elif status == INVALID_SIGNATURE:
            self._event(EventType.INVALID_FIRMWARE_SIGNATURE, result["reason"])
        return status

    def plain_update_allowed(self) -> bool:
        """UpdateFirmware (unsigned): refused once ``SignedFirmwareOnly`` is true."""
        return self.keys.raw("SignedFirmwareOnly") != "true"

    # ------------------------------------------------------------------ GetLog
    def security_log_file(
        self,
        directory: Path,
        *,
        oldest: datetime | None = None,
        latest: datetime | None = None,
    ) -> Path:
        """GetLog(SecurityLog): write the security log (``oldest``..``latest``) to a new
        file in ``directory`` and return it, for the upload GetDiagnostics uses."""
        now = self.port.now()
        name = f"{self.charge_point_id}-security-{now.strftime('%Y%m%dT%H%M%SZ')}.log"
        target = directory / name
        self.events.log.export(target, since=oldest, until=latest)
        return target

    def write_security_log(self, target: Path, oldest: float | None, latest: float | None) -> None:
        """GetLog(SecurityLog) into ``target`` (the firmware service names and uploads it);
        ``oldest``/``latest`` in epoch seconds."""

        def moment(epoch: float | None) -> datetime | None:
            return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)

        self.events.log.export(target, since=moment(oldest), until=moment(latest))


def build(
    cfg: Config,
    *,
    keys: KeyValues,
    port: SessionPort,
) -> SecurityService:
    """The service as the agent runs it, from the config file (``[security]``, ``[csms]``)."""
    section = cfg.security
    log_file = SecurityLog(
        cfg.state_dir / "security.log",
        max_bytes=int(section["log_max_kib"]) * 1024,
        keep=int(section["log_files"]),
    )
    crypto: Crypto
    if section["crypto"] == "helper":
        crypto = HelperCrypto()
    else:  # (loads the operations, and ``cryptography`` on first use, into this process)
        from agent.features.security.crypto import InProcessCrypto

        crypto = InProcessCrypto()
    return SecurityService(
        store=CertStore(cfg.state_dir),
        events=SecurityEvents(log_file, port),
        crypto=crypto,
        keys=keys,
        port=port,
        charge_point_id=str(cfg.csms["charge_point_id"]),
        password_configured=bool(cfg.csms["password"]),
        configured_ca=bool(cfg.csms["ca_file"]),
        reconnect_bound_s=float(section["profile_fallback_s"]),
        key_algorithm=str(section["key_algorithm"]),
    )
