"""Firmware update and diagnostics upload: the rules, as transition tables (no I/O, no clock).

An update is one record (:class:`Update`, persisted by the service) that moves through

    Scheduled -(retrieveDate reached)-> Downloading -(ok)-> Downloaded -(connectors idle)->
    Installing -(the new version's BootNotification Accepted)-> Installed

with DownloadFailed after the last failed attempt (``attempts`` tries, ``retry_interval_s``
apart) and InstallationFailed when the installer reports a failure (a refused package, a
rollback) or never reports. A diagnostics upload is the same, shorter: Uploading -> Uploaded
or UploadFailed. Finished records are dropped (the charge point is Idle again) and leave a
one-line result.

:func:`step` and :func:`step_upload` take the record and an event (time is part of the event)
and return the next record and the actions for the service to carry out, in order. An event
that makes no sense in the current state is answered with :class:`Ignored` (nothing changes).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


class FwState(enum.StrEnum):
    SCHEDULED = "Scheduled"  # waiting for retrieveDate
    DOWNLOADING = "Downloading"  # an attempt is running
    RETRY_WAIT = "RetryWait"  # an attempt failed; the next is due at next_at
    DOWNLOADED = "Downloaded"  # waiting for every connector to be free of transactions
    INSTALLING = "Installing"  # handed to the privileged installer


class UpState(enum.StrEnum):
    UPLOADING = "Uploading"
    RETRY_WAIT = "RetryWait"


#: FirmwareStatusNotification values, in the order OCPP 1.6 (section 6.29) gives them.
FIRMWARE_STATUSES = (
    "Downloaded",
    "DownloadFailed",
    "Downloading",
    "Idle",
    "InstallationFailed",
    "Installing",
    "Installed",
)
#: SignedFirmwareStatusNotification values (security whitepaper, FirmwareStatusEnumType).
SIGNED_FIRMWARE_STATUSES = (
    *FIRMWARE_STATUSES,
    "DownloadScheduled",
    "DownloadPaused",
    "InstallRebooting",
    "InstallScheduled",
    "InstallVerificationFailed",
    "InvalidSignature",
    "SignatureVerified",
)
DIAGNOSTICS_STATUSES = ("Idle", "Uploaded", "UploadFailed", "Uploading")


@dataclass(frozen=True, slots=True)
class Update:
    state: FwState
    location: str
    retrieve_at: float
    attempts: int  # tries allowed (at least 1)
    retry_interval_s: float
    attempt: int = 0  # tries started so far
    next_at: float | None = None
    file: str | None = None  # the downloaded file (name in the spool directory)
    from_version: str | None = None  # the version running when it went to the installer
    install_deadline: float | None = None
    last_error: str | None = None
    #: SignedUpdateFirmware (security whitepaper): its requestId, the base64 signature and
    #: the signing certificate (PEM); statuses go as SignedFirmwareStatusNotification.
    request_id: int | None = None
    signature: str | None = None
    signing_certificate: str | None = None
    verified: bool = False  # the signature of the downloaded file was verified

    @property
    def signed(self) -> bool:
        return self.signature is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "signature": self.signature,
            "signing_certificate": self.signing_certificate,
            "verified": self.verified,
            "state": self.state.value,
            "location": self.location,
            "retrieve_at": self.retrieve_at,
            "attempts": self.attempts,
            "retry_interval_s": self.retry_interval_s,
            "attempt": self.attempt,
            "next_at": self.next_at,
            "file": self.file,
            "from_version": self.from_version,
            "install_deadline": self.install_deadline,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Update:
        return cls(
            state=FwState(data["state"]),
            location=str(data["location"]),
            retrieve_at=float(data["retrieve_at"]),
            attempts=int(data["attempts"]),
            retry_interval_s=float(data["retry_interval_s"]),
            attempt=int(data["attempt"]),
            next_at=None if data.get("next_at") is None else float(data["next_at"]),
            file=data.get("file"),
            from_version=data.get("from_version"),
            install_deadline=(
                None if data.get("install_deadline") is None else float(data["install_deadline"])
            ),
            last_error=data.get("last_error"),
            request_id=None if data.get("request_id") is None else int(data["request_id"]),
            signature=data.get("signature"),
            signing_certificate=data.get("signing_certificate"),
            verified=bool(data.get("verified", False)),
        )


#: Upload kinds: GetDiagnostics' bundle, and GetLog's two log types.
DIAGNOSTICS = "Diagnostics"
DIAGNOSTICS_LOG = "DiagnosticsLog"
SECURITY_LOG = "SecurityLog"
LOG_TYPES = (DIAGNOSTICS_LOG, SECURITY_LOG)
#: LogStatusNotification values (security whitepaper, UploadLogStatusEnumType).
LOG_STATUSES = (
    "BadMessage",
    "Idle",
    "NotSupportedOperation",
    "PermissionDenied",
    "Uploaded",
    "UploadFailure",
    "Uploading",
)


@dataclass(frozen=True, slots=True)
class Upload:
    state: UpState
    location: str
    file_name: str
    start_time: float | None
    stop_time: float | None
    attempts: int
    retry_interval_s: float
    attempt: int = 0
    next_at: float | None = None
    last_error: str | None = None
    kind: str = DIAGNOSTICS  # or a GetLog logType
    request_id: int | None = None  # GetLog's requestId

    @property
    def is_log(self) -> bool:
        """A GetLog upload (statuses as LogStatusNotification with requestId)."""
        return self.kind in LOG_TYPES

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "request_id": self.request_id,
            "state": self.state.value,
            "location": self.location,
            "file_name": self.file_name,
            "start_time": self.start_time,
            "stop_time": self.stop_time,
            "attempts": self.attempts,
            "retry_interval_s": self.retry_interval_s,
            "attempt": self.attempt,
            "next_at": self.next_at,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Upload:
        def opt(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(
            state=UpState(data["state"]),
            location=str(data["location"]),
            file_name=str(data["file_name"]),
            start_time=opt("start_time"),
            stop_time=opt("stop_time"),
            attempts=int(data["attempts"]),
            retry_interval_s=float(data["retry_interval_s"]),
            attempt=int(data["attempt"]),
            next_at=opt("next_at"),
            last_error=data.get("last_error"),
            kind=str(data.get("kind", DIAGNOSTICS)),
            request_id=None if data.get("request_id") is None else int(data["request_id"]),
        )


# --- events (what happened; ``now`` is the wall clock in seconds since the epoch)


@dataclass(frozen=True, slots=True)
class Requested:
    """UpdateFirmware.req. ``retrieve_at`` in the past means now."""

    location: str
    retrieve_at: float
    attempts: int
    retry_interval_s: float
    now: float
    request_id: int | None = None  # SignedUpdateFirmware: these three are set
    signature: str | None = None
    signing_certificate: str | None = None


@dataclass(frozen=True, slots=True)
class Resumed:
    """The agent started with this record on disk (a restart, a power cut)."""

    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """A wake-up the service was asked for (WakeAt) came due."""

    now: float


@dataclass(frozen=True, slots=True)
class DownloadOk:
    file: str
    now: float


@dataclass(frozen=True, slots=True)
class DownloadError:
    reason: str
    retryable: bool
    now: float


@dataclass(frozen=True, slots=True)
class SignatureChecked:
    """The downloaded file's signature was checked: ``status`` is SignatureVerified,
    InvalidSignature or InvalidCertificate."""

    status: str
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class ConnectorsIdle:
    """No transaction is running (the service asked with WaitForIdle)."""

    version: str  # the version running now, to tell the new one when it boots
    install_timeout_s: float
    now: float


@dataclass(frozen=True, slots=True)
class InstallerFailed:
    """The installer refused the package, or installed it and rolled it back."""

    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class InstallerSucceeded:
    """The installer saw the new version reach BootNotification Accepted."""

    version: str
    now: float


@dataclass(frozen=True, slots=True)
class BootAccepted:
    """BootNotification.conf Accepted, sent with firmwareVersion ``version``."""

    version: str
    now: float


@dataclass(frozen=True, slots=True)
class UploadRequested:
    """GetDiagnostics.req; ``file_name`` is what the answer carries."""

    location: str
    file_name: str
    start_time: float | None
    stop_time: float | None
    attempts: int
    retry_interval_s: float
    now: float
    kind: str = DIAGNOSTICS
    request_id: int | None = None


@dataclass(frozen=True, slots=True)
class UploadOk:
    now: float


@dataclass(frozen=True, slots=True)
class UploadError:
    reason: str
    retryable: bool
    now: float
    #: for GetLog, the LogStatusNotification a refusal ends with (BadMessage,
    #: NotSupportedOperation, PermissionDenied); None: UploadFailure
    log_status: str | None = None


# --- actions (what the service must do, in order)


@dataclass(frozen=True, slots=True)
class SendStatus:
    """FirmwareStatusNotification (or DiagnosticsStatusNotification for an upload)."""

    status: str


@dataclass(frozen=True, slots=True)
class StartDownload:
    attempt: int


@dataclass(frozen=True, slots=True)
class StartUpload:
    attempt: int


@dataclass(frozen=True, slots=True)
class VerifySignature:
    """Check the downloaded file's signature (SignedUpdateFirmware) before any install."""

    file: str


@dataclass(frozen=True, slots=True)
class WakeAt:
    at: float


@dataclass(frozen=True, slots=True)
class WaitForIdle:
    pass


@dataclass(frozen=True, slots=True)
class BlockCharging:
    blocked: bool


@dataclass(frozen=True, slots=True)
class HandToInstaller:
    file: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Delete the record's files (partial download, bundle) and the record."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The record is done; ``result`` is the one-line last result."""

    result: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """The event does not apply in this state: nothing changed."""

    reason: str


Action = (
    SendStatus
    | StartDownload
    | StartUpload
    | VerifySignature
    | WakeAt
    | WaitForIdle
    | BlockCharging
    | HandToInstaller
    | Discard
    | Finished
    | Ignored
)
Step = tuple[Any, list[Action]]


# --- the firmware update table


def _requested(update: Update | None, ev: Requested) -> tuple[Update | None, list[Action]]:
    if update is not None and update.state is FwState.INSTALLING:
        return update, [Ignored("an installation is in progress")]
    actions: list[Action] = [Discard()] if update is not None else []
    new = Update(
        state=FwState.SCHEDULED,
        location=ev.location,
        retrieve_at=ev.retrieve_at,
        attempts=max(1, ev.attempts),
        retry_interval_s=max(0.0, ev.retry_interval_s),
        request_id=ev.request_id,
        signature=ev.signature,
        signing_certificate=ev.signing_certificate,
    )
    if ev.retrieve_at > ev.now:
        scheduled: list[Action] = [SendStatus("DownloadScheduled")] if new.signed else []
        return new, [*actions, *scheduled, WakeAt(ev.retrieve_at)]
    return _begin(new, actions)


def _begin(update: Update, actions: list[Action]) -> tuple[Update, list[Action]]:
    new = replace(update, state=FwState.DOWNLOADING, attempt=1, next_at=None)
    return new, [*actions, SendStatus("Downloading"), StartDownload(1)]


def _scheduled_tick(update: Update, ev: Tick) -> tuple[Update | None, list[Action]]:
    if ev.now < update.retrieve_at:
        return update, [WakeAt(update.retrieve_at)]
    return _begin(update, [])


def _retry_tick(update: Update, ev: Tick) -> tuple[Update | None, list[Action]]:
    assert update.next_at is not None
    if ev.now < update.next_at:
        return update, [WakeAt(update.next_at)]
    attempt = update.attempt + 1
    new = replace(update, state=FwState.DOWNLOADING, attempt=attempt, next_at=None)
    return new, [StartDownload(attempt)]


def _download_ok(update: Update, ev: DownloadOk) -> tuple[Update | None, list[Action]]:
    new = replace(update, state=FwState.DOWNLOADED, file=ev.file, last_error=None)
    if update.signed:  # nothing signed is installed before its signature is verified
        return new, [SendStatus("Downloaded"), VerifySignature(ev.file)]
    return new, [SendStatus("Downloaded"), WaitForIdle()]


def _signature_checked(update: Update, ev: SignatureChecked) -> tuple[Update | None, list[Action]]:
    if not update.signed or update.verified:
        return update, [Ignored("no signature check was pending")]
    if ev.status == "SignatureVerified":
        return replace(update, verified=True), [SendStatus("SignatureVerified"), WaitForIdle()]
    # SignedFirmwareStatusNotification has no InvalidCertificate: a signing certificate
    # found invalid after the download (expired, its root deleted) is an InvalidSignature
    # there (the security event still says InvalidFirmwareSigningCertificate).
    sent = ev.status if ev.status in SIGNED_FIRMWARE_STATUSES else "InvalidSignature"
    return None, [SendStatus(sent), Discard(), Finished(f"{ev.status}: {ev.reason}")]


def _download_error(update: Update, ev: DownloadError) -> tuple[Update | None, list[Action]]:
    if ev.retryable and update.attempt < update.attempts:
        at = ev.now + update.retry_interval_s
        new = replace(update, state=FwState.RETRY_WAIT, next_at=at, last_error=ev.reason)
        return new, [WakeAt(at)]
    return None, [
        SendStatus("DownloadFailed"),
        Discard(),
        Finished(f"DownloadFailed after {update.attempt} attempt(s): {ev.reason}"),
    ]


def _connectors_idle(update: Update, ev: ConnectorsIdle) -> tuple[Update | None, list[Action]]:
    assert update.file is not None
    if update.signed and not update.verified:
        return update, [Ignored("the signature was not verified")]
    new = replace(
        update,
        state=FwState.INSTALLING,
        from_version=ev.version,
        install_deadline=ev.now + ev.install_timeout_s,
    )
    return new, [SendStatus("Installing"), BlockCharging(True), HandToInstaller(update.file)]


def _install_failed(update: Update, reason: str) -> tuple[Update | None, list[Action]]:
    return None, [
        SendStatus("InstallationFailed"),
        BlockCharging(False),
        Discard(),
        Finished(f"InstallationFailed: {reason}"),
    ]


def _installed(version: str) -> tuple[Update | None, list[Action]]:
    return None, [
        SendStatus("Installed"),
        BlockCharging(False),
        Discard(),
        Finished(f"Installed {version}"),
    ]


def _boot_accepted(update: Update, ev: BootAccepted) -> tuple[Update | None, list[Action]]:
    if ev.version == update.from_version:
        return update, [Ignored("the version that handed over the update is still running")]
    return _installed(ev.version)


def _installing_tick(update: Update, ev: Tick) -> tuple[Update | None, list[Action]]:
    assert update.install_deadline is not None
    if ev.now < update.install_deadline:
        return update, [WakeAt(update.install_deadline)]
    return _install_failed(update, "the installer did not report in time (is it installed?)")


def _resumed(update: Update, ev: Resumed) -> tuple[Update | None, list[Action]]:
    state = update.state
    if state is FwState.SCHEDULED:
        return _scheduled_tick(update, Tick(ev.now))
    if state is FwState.RETRY_WAIT:
        return _retry_tick(update, Tick(ev.now))
    if state is FwState.DOWNLOADING:
        return update, [StartDownload(update.attempt)]  # carries on from the partial file
    if state is FwState.DOWNLOADED:
        if update.signed and not update.verified:
            assert update.file is not None
            return update, [VerifySignature(update.file)]
        return update, [WaitForIdle()]
    assert update.install_deadline is not None
    return update, [BlockCharging(True), WakeAt(update.install_deadline)]


_FW_TABLE: dict[tuple[FwState, type], Callable[[Update, Any], tuple[Update | None, list[Action]]]]
_FW_TABLE = {
    (FwState.SCHEDULED, Tick): _scheduled_tick,
    (FwState.RETRY_WAIT, Tick): _retry_tick,
    (FwState.DOWNLOADING, DownloadOk): _download_ok,
    (FwState.DOWNLOADING, DownloadError): _download_error,
    (FwState.DOWNLOADED, ConnectorsIdle): _connectors_idle,
    (FwState.DOWNLOADED, SignatureChecked): _signature_checked,
    (FwState.INSTALLING, InstallerFailed): lambda u, ev: _install_failed(u, ev.reason),
    (FwState.INSTALLING, InstallerSucceeded): lambda u, ev: _installed(ev.version),
    (FwState.INSTALLING, BootAccepted): _boot_accepted,
    (FwState.INSTALLING, Tick): _installing_tick,
    **{(state, Resumed): _resumed for state in FwState},
}

FirmwareEvent = (
    Requested
    | Resumed
    | Tick
    | DownloadOk
    | DownloadError
    | SignatureChecked
    | ConnectorsIdle
    | InstallerFailed
    | InstallerSucceeded
    | BootAccepted
)


def step(update: Update | None, event: FirmwareEvent) -> tuple[Update | None, list[Action]]:
    """The next record (None: nothing pending) and the actions, for ``event``."""
    if isinstance(event, Requested):
        return _requested(update, event)
    if update is None:
        return None, [Ignored(f"{type(event).__name__} with no update pending")]
    handler = _FW_TABLE.get((update.state, type(event)))
    if handler is None:
        return update, [Ignored(f"{type(event).__name__} in state {update.state.value}")]
    return handler(update, event)


def firmware_status(update: Update | None) -> str:
    """What TriggerMessage(FirmwareStatusNotification) reports now."""
    if update is None or update.state is FwState.SCHEDULED:
        return "Idle"
    if update.state is FwState.RETRY_WAIT:
        return "Downloading"
    return update.state.value


def signed_firmware_status(update: Update | None) -> str:
    """The same for a signed update, as a SignedFirmwareStatusNotification value (which
    adds DownloadScheduled and SignatureVerified)."""
    if update is not None and update.state is FwState.SCHEDULED:
        return "DownloadScheduled"
    if update is not None and update.state is FwState.DOWNLOADED and update.verified:
        return "SignatureVerified"
    return firmware_status(update)


def log_status(upload: Upload | None) -> str:
    """What ExtendedTriggerMessage(LogStatusNotification) reports now."""
    return "Idle" if upload is None else "Uploading"


# --- the diagnostics upload table


def _upload_requested(upload: Upload | None, ev: UploadRequested) -> Step:
    actions: list[Action] = [Discard()] if upload is not None else []
    new = Upload(
        state=UpState.UPLOADING,
        location=ev.location,
        file_name=ev.file_name,
        start_time=ev.start_time,
        stop_time=ev.stop_time,
        attempts=max(1, ev.attempts),
        retry_interval_s=max(0.0, ev.retry_interval_s),
        attempt=1,
        kind=ev.kind,
        request_id=ev.request_id,
    )
    return new, [*actions, SendStatus("Uploading"), StartUpload(1)]


def _upload_ok(upload: Upload, ev: UploadOk) -> Step:
    return None, [SendStatus("Uploaded"), Discard(), Finished(f"Uploaded {upload.file_name}")]


def _upload_error(upload: Upload, ev: UploadError) -> Step:
    if ev.retryable and upload.attempt < upload.attempts:
        at = ev.now + upload.retry_interval_s
        return replace(upload, state=UpState.RETRY_WAIT, next_at=at, last_error=ev.reason), [
            WakeAt(at)
        ]
    failed = (ev.log_status or "UploadFailure") if upload.is_log else "UploadFailed"
    return None, [
        SendStatus(failed),
        Discard(),
        Finished(f"{failed} after {upload.attempt} attempt(s): {ev.reason}"),
    ]


def _upload_tick(upload: Upload, ev: Tick) -> Step:
    assert upload.next_at is not None
    if ev.now < upload.next_at:
        return upload, [WakeAt(upload.next_at)]
    attempt = upload.attempt + 1
    return replace(upload, state=UpState.UPLOADING, attempt=attempt, next_at=None), [
        StartUpload(attempt)
    ]


def _upload_resumed(upload: Upload, ev: Resumed) -> Step:
    if upload.state is UpState.RETRY_WAIT:
        return _upload_tick(upload, Tick(ev.now))
    return upload, [StartUpload(upload.attempt)]


_UP_TABLE: dict[tuple[UpState, type], Callable[[Upload, Any], Step]] = {
    (UpState.UPLOADING, UploadOk): _upload_ok,
    (UpState.UPLOADING, UploadError): _upload_error,
    (UpState.RETRY_WAIT, Tick): _upload_tick,
    **{(state, Resumed): _upload_resumed for state in UpState},
}

UploadEvent = UploadRequested | UploadOk | UploadError | Tick | Resumed


def step_upload(upload: Upload | None, event: UploadEvent) -> tuple[Upload | None, list[Action]]:
    if isinstance(event, UploadRequested):
        return _upload_requested(upload, event)
    if upload is None:
        return None, [Ignored(f"{type(event).__name__} with no upload pending")]
    handler = _UP_TABLE.get((upload.state, type(event)))
    if handler is None:
        return upload, [Ignored(f"{type(event).__name__} in state {upload.state.value}")]
    return handler(upload, event)


def diagnostics_status(upload: Upload | None) -> str:
    """What TriggerMessage(DiagnosticsStatusNotification) reports now."""
    return "Idle" if upload is None else "Uploading"
