"""The Firmware Management service: drives :mod:`agent.core.firmware` with real files,
processes and timers.

It reaches the charge point only through :class:`ChargePointPort`. Everything it must not
forget lives in ``<spool>/state.json`` (written atomically), so a charger restarted
mid-download carries on after boot from the partial file. Transfers and the diagnostics
bundle run in the transfer helper process (:mod:`agent.features.firmware.transfer`); the
install is handed to the privileged ``evcp-installer`` unit through files in the spool
directory (this process never gets root):

* ``install.request`` (agent -> installer; its appearance starts ``evcp-installer.path``):
  ``{"file": "<name in the spool>", "from_version": "...", "requested_at": <epoch>}``;
* ``boot-accepted`` (agent -> installer): ``{"version": "...", "at": <epoch>}``, rewritten at
  every BootNotification Accepted: the health proof the installer waits for;
* ``install.result`` (installer -> agent): ``{"status": "Installed"|"InstallationFailed",
  "reason": "...", "version": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.core import firmware as fw
from agent.features.firmware.diagnostics import bundle_name

log = logging.getLogger("evcp.firmware")

STATE_FILE = "state.json"
DOWNLOAD_FILE = "firmware.download"
INSTALL_REQUEST = "install.request"
INSTALL_RESULT = "install.result"
BOOT_MARKER = "boot-accepted"
#: The upload channels: GetDiagnostics' and GetLog's (one of each may run at a time).
UPLOAD_CHANNELS = ("diagnostics", "log")
#: What the installer may take beyond rollback_after_s (copy, verify, dpkg, restart).
INSTALL_MARGIN_S = 600.0


class ChargePointPort(Protocol):
    """What the firmware service needs from the charge point and the OCPP session."""

    async def send_firmware_status(self, status: str, request_id: int | None = None) -> None:
        """Send FirmwareStatusNotification.req with ``status`` (with a ``request_id``: a
        signed update's SignedFirmwareStatusNotification.req)."""

    async def send_diagnostics_status(self, status: str) -> None:
        """Send DiagnosticsStatusNotification.req with ``status``."""

    async def send_log_status(self, status: str, request_id: int | None) -> None:
        """Send LogStatusNotification.req (GetLog's; ``request_id`` None when Idle)."""

    async def verify_firmware(self, path: Path, signature: str, signing_certificate: str) -> str:
        """SignatureVerified, InvalidSignature or InvalidCertificate (raising the security
        event of a failure)."""

    def write_security_log(self, target: Path, oldest: float | None, latest: float | None) -> None:
        """Write the security log (entries from ``oldest`` to ``latest``) to ``target``."""

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no transaction is running (at once if none is)."""

    def block_charging(self, blocked: bool) -> None:
        """While True no new transaction starts (connectors Unavailable); running ones go on."""

    def firmware_version(self) -> str:
        """The version this process runs (BootNotification's firmwareVersion)."""

    def status_summary(self) -> dict[str, Any]:
        """The status and queue summary for a diagnostics bundle (JSON-able)."""


@dataclass(frozen=True, slots=True)
class Settings:
    spool_dir: Path
    config_path: Path
    state_db: Path
    charge_point_id: str
    ca_file: str = ""
    allow_http: bool = False
    upload_method: str = "put"
    default_retries: int = 3
    default_retry_interval_s: float = 60.0
    transfer_timeout_s: float = 60.0
    rollback_after_s: float = 300.0
    #: the installer must take install.request within this, or the install fails at once
    pickup_timeout_s: float = 120.0
    python: str = sys.executable
    journalctl: str = "journalctl"
    unit: str = "evcp"
    #: Check a download is an ``evcp`` Debian package before calling it Downloaded (a
    #: corrupt one is downloaded again); off when ``install_command`` installs an image.
    check_package: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """From a validated :class:`agent.config.Config`."""
        f = cfg.firmware
        return cls(
            spool_dir=cfg.firmware_dir,
            config_path=cfg.path,
            state_db=cfg.state_dir / "evcp.db",
            charge_point_id=str(cfg.csms["charge_point_id"]),
            ca_file=str(f["ca_file"]),
            allow_http=bool(f["allow_http"]),
            upload_method=str(f["upload_method"]),
            default_retries=int(f["default_retries"]),
            default_retry_interval_s=float(f["default_retry_interval_s"]),
            transfer_timeout_s=float(f["transfer_timeout_s"]),
            rollback_after_s=float(f["rollback_after_s"]),
            check_package=not str(f["install_command"]),
        )


@dataclass
class Persisted:
    update: fw.Update | None = None
    upload: fw.Upload | None = None
    last_result: str | None = None
    log: fw.Upload | None = None  # GetLog's upload (beside GetDiagnostics')


def read_state(spool_dir: Path) -> Persisted:
    """The persisted state (an unreadable file is reported and treated as empty)."""
    path = spool_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return Persisted(
            update=fw.Update.from_json(data["update"]) if data.get("update") else None,
            upload=fw.Upload.from_json(data["upload"]) if data.get("upload") else None,
            last_result=data.get("last_result"),
            log=fw.Upload.from_json(data["log"]) if data.get("log") else None,
        )
    except FileNotFoundError:
        return Persisted()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("firmware: %s unreadable (%s): starting with nothing pending", path, exc)
        return Persisted()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FirmwareService:
    def __init__(
        self,
        port: ChargePointPort,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.port = port
        self.settings = settings
        self.spool = settings.spool_dir
        self._now = clock
        self.state = Persisted()
        self._tasks: set[asyncio.Task[None]] = set()
        #: per channel ("firmware", "diagnostics", "log"): the pending wake-up
        self._timers: dict[str, asyncio.Task[None] | None] = {}
        self._result_watch: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[tuple[str, str, int | None]] = asyncio.Queue()
        self._registered = asyncio.Event()
        self._processes: dict[asyncio.subprocess.Process, str] = {}
        self._started = False
        self._generation = {
            "download": 0,
            "diagnostics": 0,
            "log": 0,
        }  # of the current download/upload: a stale helper's end is ignored

    # --- life cycle

    async def start(self) -> None:
        """Load the persisted state and carry on with what was pending."""
        self.begin()

    def begin(self) -> None:
        """:meth:`start` without awaiting (it awaits nothing): for a service loaded on
        first need, from a handler."""
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.state = read_state(self.spool)
        self._started = True
        self._spawn(self._send_loop())
        if self.state.update is not None:
            if self.state.update.state is fw.FwState.INSTALLING and self._read_result():
                pass  # the installer's verdict was fed
            else:
                self._feed(fw.Resumed(self._now()))
        else:
            (self.spool / INSTALL_RESULT).unlink(missing_ok=True)
        for channel in UPLOAD_CHANNELS:
            if self._upload_record(channel) is not None:
                self._feed_upload(fw.Resumed(self._now()), channel)

    async def stop(self) -> None:
        self._started = False
        for process in list(self._processes):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        tasks = [t for t in (*self._tasks, *self._timers.values(), self._result_watch)]
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # --- what the OCPP handlers call (each returns at once)

    def update_firmware(
        self,
        location: str,
        retrieve_date: float,
        retries: int | None = None,
        retry_interval_s: float | None = None,
        *,
        request_id: int | None = None,
        signature: str | None = None,
        signing_certificate: str | None = None,
    ) -> None:
        """UpdateFirmware.req (retrieveDate as epoch seconds; one in the past means now);
        with ``signature`` and ``signing_certificate``, SignedUpdateFirmware.req (the file
        is installed only once its signature is verified)."""
        self._feed(
            fw.Requested(
                location=location,
                retrieve_at=retrieve_date,
                attempts=self.settings.default_retries if retries is None else retries,
                retry_interval_s=(
                    self.settings.default_retry_interval_s
                    if retry_interval_s is None
                    else retry_interval_s
                ),
                now=self._now(),
                request_id=request_id,
                signature=signature,
                signing_certificate=signing_certificate,
            )
        )

    def update_pending(self) -> bool:
        """An update is under way (a new one would replace it: AcceptedCanceled)."""
        return self.state.update is not None

    def installing(self) -> bool:
        """The installer has the update: a new one is refused until it reports."""
        return self.charging_blocked()

    def get_log(
        self,
        log_type: str,
        location: str,
        request_id: int,
        oldest: float | None = None,
        latest: float | None = None,
        retries: int | None = None,
        retry_interval_s: float | None = None,
    ) -> tuple[str, str]:
        """GetLog.req (security whitepaper): ("Accepted" or "AcceptedCanceled" when it
        replaces an upload under way, file name). ``log_type`` is DiagnosticsLog (the
        GetDiagnostics bundle) or SecurityLog (the security log as text)."""
        if log_type not in fw.LOG_TYPES:
            raise ValueError(f"logType {log_type!r}: expected one of {fw.LOG_TYPES}")
        now = self._now()
        if log_type == fw.DIAGNOSTICS_LOG:
            name = bundle_name(self.settings.charge_point_id, now)
        else:
            name = security_log_name(self.settings.charge_point_id, now)
        status = "AcceptedCanceled" if self.state.log is not None else "Accepted"
        self._feed_upload(
            fw.UploadRequested(
                location=location,
                file_name=name,
                start_time=oldest,
                stop_time=latest,
                attempts=self.settings.default_retries if retries is None else retries,
                retry_interval_s=(
                    self.settings.default_retry_interval_s
                    if retry_interval_s is None
                    else retry_interval_s
                ),
                now=now,
                kind=log_type,
                request_id=request_id,
            ),
            "log",
        )
        return status, name

    def send_log_status(self) -> None:
        """ExtendedTriggerMessage(LogStatusNotification): Uploading (with the requestId)
        while a GetLog upload is under way, else Idle."""
        upload = self.state.log
        self._outbox.put_nowait(
            ("log", fw.log_status(upload), None if upload is None else upload.request_id)
        )

    def send_firmware_status_now(self) -> None:
        """ExtendedTriggerMessage(FirmwareStatusNotification): a signed update's status as
        SignedFirmwareStatusNotification (with its requestId), else the plain one."""
        update = self.state.update
        if update is not None and update.signed:
            status = fw.signed_firmware_status(update)
            self._outbox.put_nowait(("firmware", status, update.request_id))
        else:
            self._outbox.put_nowait(("firmware", fw.firmware_status(update), None))

    def get_diagnostics(
        self,
        location: str,
        start_time: float | None = None,
        stop_time: float | None = None,
        retries: int | None = None,
        retry_interval_s: float | None = None,
    ) -> str:
        """GetDiagnostics.req; returns the file name for GetDiagnostics.conf."""
        now = self._now()
        name = bundle_name(self.settings.charge_point_id, now)
        self._feed_upload(
            fw.UploadRequested(
                location=location,
                file_name=name,
                start_time=start_time,
                stop_time=stop_time,
                attempts=self.settings.default_retries if retries is None else retries,
                retry_interval_s=(
                    self.settings.default_retry_interval_s
                    if retry_interval_s is None
                    else retry_interval_s
                ),
                now=now,
            ),
            "diagnostics",
        )
        return name

    def on_boot_accepted(self) -> None:
        """BootNotification.conf Accepted: the health proof. Writes the marker the installer
        waits for, and reports Installed when this is the new version."""
        version = self.port.firmware_version()
        _write_atomic(self.spool / BOOT_MARKER, json.dumps({"version": version, "at": self._now()}))
        self._registered.set()
        if self.charging_blocked():  # Installing: is this the new version?
            self._feed(fw.BootAccepted(version, self._now()))

    def firmware_status(self) -> str:
        """For TriggerMessage(FirmwareStatusNotification)."""
        return fw.firmware_status(self.state.update)

    def diagnostics_status(self) -> str:
        """For TriggerMessage(DiagnosticsStatusNotification)."""
        return fw.diagnostics_status(self.state.upload)

    def charging_blocked(self) -> bool:
        update = self.state.update
        return update is not None and update.state is fw.FwState.INSTALLING

    # --- the machine

    def _persist(self) -> None:
        data = {
            "update": self.state.update.to_json() if self.state.update else None,
            "upload": self.state.upload.to_json() if self.state.upload else None,
            "last_result": self.state.last_result,
            "log": self.state.log.to_json() if self.state.log else None,
        }
        _write_atomic(self.spool / STATE_FILE, json.dumps(data, indent=1))

    def _feed(self, event: fw.FirmwareEvent) -> None:
        update, actions = fw.step(self.state.update, event)
        old = self.state.update
        self.state.update = update
        for action in actions:
            if isinstance(action, fw.Finished):
                self.state.last_result = action.result
        self._persist()  # before acting: a restart carries on from here
        for action in actions:
            self._act(action, old, update or old, "firmware")

    def _upload_record(self, channel: str) -> fw.Upload | None:
        return self.state.log if channel == "log" else self.state.upload

    def _feed_upload(self, event: fw.UploadEvent, channel: str) -> None:
        old = self._upload_record(channel)
        upload, actions = fw.step_upload(old, event)
        if channel == "log":
            self.state.log = upload
        else:
            self.state.upload = upload
        self._persist()
        for action in actions:
            self._act(action, old, upload or old, channel)

    def _act(self, action: fw.Action, old: Any, record: Any, channel: str) -> None:
        """Carry out ``action`` for ``channel``; ``record`` is the record it concerns (the
        new one, or the finished one)."""
        if isinstance(action, fw.SendStatus):
            log.info("%s status: %s", channel, action.status)
            request_id = getattr(record, "request_id", None)
            self._outbox.put_nowait((channel, action.status, request_id))
        elif isinstance(action, fw.VerifySignature):
            self._spawn(self._verify(action.file, self._generation["download"]))
        elif isinstance(action, fw.StartDownload):
            update = self.state.update
            assert update is not None
            self._generation["download"] += 1
            generation = self._generation["download"]
            self._spawn(self._download(update.location, action.attempt, generation))
        elif isinstance(action, fw.StartUpload):
            self._generation[channel] += 1
            self._spawn(self._upload(channel, action.attempt, self._generation[channel]))
        elif isinstance(action, fw.WakeAt):
            self._wake_at(action.at, channel)
        elif isinstance(action, fw.WaitForIdle):
            loop = asyncio.get_running_loop()

            def idle() -> None:
                loop.call_soon(self._connectors_idle)  # never re-entered from inside _feed

            self.port.when_idle(idle)
        elif isinstance(action, fw.BlockCharging):
            self.port.block_charging(action.blocked)
        elif isinstance(action, fw.HandToInstaller):
            self._hand_over(action.file)
        elif isinstance(action, fw.Discard):
            self._discard(old, channel)
        elif isinstance(action, fw.Finished):
            log.info("firmware: %s", action.result)
        elif isinstance(action, fw.Ignored):
            log.warning("firmware: ignored: %s", action.reason)

    def _connectors_idle(self) -> None:
        if not self._started:
            return
        self._feed(
            fw.ConnectorsIdle(
                version=self.port.firmware_version(),
                install_timeout_s=self.settings.rollback_after_s + INSTALL_MARGIN_S,
                now=self._now(),
            )
        )

    def _wake_at(self, at: float, channel: str) -> None:
        async def wake() -> None:
            while (delay := at - self._now()) > 0:
                await asyncio.sleep(min(delay, 60.0))  # re-read the wall clock (NTP steps)
            self._timers[channel] = None
            if channel == "firmware":
                self._feed(fw.Tick(self._now()))
            else:
                self._feed_upload(fw.Tick(self._now()), channel)

        current = self._timers.get(channel)
        if current is not None:
            current.cancel()
        self._timers[channel] = asyncio.get_running_loop().create_task(wake())
        if channel == "firmware" and self.charging_blocked():
            self._watch_result()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_loop(self) -> None:
        while True:
            kind, status, request_id = await self._outbox.get()
            await self._registered.wait()  # after this boot's BootNotification Accepted
            try:
                if kind == "firmware":
                    await self.port.send_firmware_status(status, request_id)
                elif kind == "log":
                    await self.port.send_log_status(status, request_id)
                else:
                    await self.port.send_diagnostics_status(status)
            except Exception:
                log.exception("firmware: could not send %s status %s", kind, status)

    def _kill(self, command: str) -> None:
        for process, kind in list(self._processes.items()):
            if kind == command:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def _helper(self, *args: str, tag: str = "") -> tuple[int, dict[str, Any]]:
        """Run the transfer helper; its exit status and its JSON line."""
        process = await asyncio.create_subprocess_exec(
            self.settings.python,
            "-m",
            "agent.features.firmware.transfer",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parents[3]),
        )
        self._processes[process] = tag or args[0]
        try:
            out, err = await process.communicate()
        finally:
            self._processes.pop(process, None)
        code = process.returncode if process.returncode is not None else -1
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
            if not isinstance(result, dict):
                raise ValueError("not an object")
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            result = {"ok": False, "error": f"helper exit {code}: {tail[0]}", "retryable": True}
        return code, result

    def _transfer_args(self) -> list[str]:
        args = ["--timeout", str(self.settings.transfer_timeout_s)]
        if self.settings.ca_file:
            args += ["--ca-file", self.settings.ca_file]
        if self.settings.allow_http:
            args.append("--allow-http")
        return args

    async def _download(self, location: str, attempt: int, generation: int) -> None:
        dest = self.spool / DOWNLOAD_FILE
        dest.unlink(missing_ok=True)
        log.info("firmware: download attempt %d of %s", attempt, location)
        code, result = await self._helper(
            "download", "--url", location, "--dest", str(dest), *self._transfer_args()
        )
        if generation != self._generation["download"] or self.state.update is None:
            return  # replaced meanwhile
        if code == 0 and result.get("ok") and self.settings.check_package:
            problem = await _package_problem(dest)
            if problem is not None:
                code, result = 1, {"ok": False, "error": problem, "retryable": True}
                dest.unlink(missing_ok=True)  # (downloaded again whole, not resumed)
        if generation != self._generation["download"] or self.state.update is None:
            return  # replaced meanwhile
        if code == 0 and result.get("ok"):
            self._feed(fw.DownloadOk(DOWNLOAD_FILE, self._now()))
        else:
            reason = str(result.get("error", f"exit status {code}"))
            log.warning("firmware: download attempt %d failed: %s", attempt, reason)
            self._feed(fw.DownloadError(reason, bool(result.get("retryable")), self._now()))

    async def _verify(self, file: str, generation: int) -> None:
        """Check the downloaded file's signature (in the security service's helper)."""
        update = self.state.update
        assert update is not None and update.signature and update.signing_certificate
        try:
            status = await self.port.verify_firmware(
                self.spool / file, update.signature, update.signing_certificate
            )
            reason = "" if status == "SignatureVerified" else "the security log has the reason"
        except Exception as exc:  # a broken check never lets the file through
            log.exception("firmware: signature check failed")
            status, reason = "InvalidSignature", f"the check failed: {exc}"
        if generation != self._generation["download"] or self.state.update is None:
            return  # replaced meanwhile
        log.info("firmware: signature check: %s", status)
        self._feed(fw.SignatureChecked(status, reason, self._now()))

    def _upload_done(self, channel: str, generation: int) -> bool:
        """The upload this helper ran for was cancelled or replaced meanwhile."""
        return generation != self._generation[channel] or self._upload_record(channel) is None

    def _upload_failed(self, channel: str, result: dict[str, Any], code: int) -> None:
        reason = str(result.get("error", f"exit status {code}"))
        log.warning("%s: upload failed: %s", channel, reason)
        log_status = result.get("log_status")
        self._feed_upload(
            fw.UploadError(
                reason,
                bool(result.get("retryable")),
                self._now(),
                log_status=str(log_status) if log_status else None,
            ),
            channel,
        )

    async def _upload(self, channel: str, attempt: int, generation: int) -> None:
        upload = self._upload_record(channel)
        assert upload is not None
        bundle = self.spool / upload.file_name
        if not bundle.exists() and upload.kind == fw.SECURITY_LOG:
            try:
                self.port.write_security_log(bundle, upload.start_time, upload.stop_time)
            except OSError as exc:
                bundle.unlink(missing_ok=True)
                self._upload_failed(channel, {"error": f"security log: {exc}"}, 0)
                return
        if not bundle.exists():
            status_file = self.spool / f"status-{channel}.json"
            try:
                summary = self.port.status_summary()
            except Exception as exc:
                summary = {"error": f"status summary unavailable: {exc}"}
            status_file.write_text(json.dumps(summary, indent=1, default=str))
            args = ["bundle", "--out", str(bundle), "--config", str(self.settings.config_path)]
            args += ["--state-db", str(self.settings.state_db), "--status-json", str(status_file)]
            args += ["--unit", self.settings.unit, "--journalctl", self.settings.journalctl]
            if upload.start_time is not None:
                args += ["--since", str(upload.start_time)]
            if upload.stop_time is not None:
                args += ["--until", str(upload.stop_time)]
            code, result = await self._helper(*args, tag=channel)
            status_file.unlink(missing_ok=True)
            if code != 0 or not result.get("ok"):
                if not self._upload_done(channel, generation):
                    result.setdefault("error", f"bundle failed, exit status {code}")
                    self._upload_failed(channel, {**result, "retryable": True}, code)
                return
        code, result = await self._helper(
            "upload",
            "--url",
            upload.location,
            "--file",
            str(bundle),
            "--method",
            self.settings.upload_method,
            *self._transfer_args(),
            tag=channel,
        )
        if self._upload_done(channel, generation):
            return
        if code == 0 and result.get("ok"):
            self._feed_upload(fw.UploadOk(self._now()), channel)
        else:
            log.warning("%s: upload attempt %d failed", channel, attempt)
            self._upload_failed(channel, result, code)

    def _hand_over(self, file: str) -> None:
        (self.spool / INSTALL_RESULT).unlink(missing_ok=True)
        request = {
            "file": file,
            "from_version": self.port.firmware_version(),
            "requested_at": self._now(),
        }
        _write_atomic(self.spool / INSTALL_REQUEST, json.dumps(request))
        self._watch_result()

    def _watch_result(self) -> None:
        if self._result_watch is not None and not self._result_watch.done():
            return

        async def watch() -> None:
            loop = asyncio.get_running_loop()
            pickup_deadline = loop.time() + self.settings.pickup_timeout_s
            request = self.spool / INSTALL_REQUEST
            while self.charging_blocked():
                if self._read_result():
                    return
                if request.exists() and loop.time() > pickup_deadline:
                    request.unlink(missing_ok=True)
                    reason = (
                        f"the installer did not take the update within"
                        f" {self.settings.pickup_timeout_s:g} s (is evcp-installer.path enabled?)"
                    )
                    log.error("firmware: %s", reason)
                    self._feed(fw.InstallerFailed(reason, self._now()))
                    return
                await asyncio.sleep(0.5)

        self._result_watch = asyncio.get_running_loop().create_task(watch())

    def _read_result(self) -> bool:
        """Feed the installer's verdict, if it has written one."""
        path = self.spool / INSTALL_RESULT
        try:
            result = json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            result = {"status": "InstallationFailed", "reason": f"unreadable result: {exc}"}
        path.unlink(missing_ok=True)
        if result.get("status") == "Installed":
            self._feed(fw.InstallerSucceeded(str(result.get("version", "")), self._now()))
        else:
            reason = str(result.get("reason", "the installer reported a failure"))
            self._feed(fw.InstallerFailed(reason, self._now()))
        return True

    def _discard(self, old: Any, channel: str) -> None:
        if channel == "firmware":
            self._kill("download")
            for name in (DOWNLOAD_FILE, DOWNLOAD_FILE + ".part", DOWNLOAD_FILE + ".part.json"):
                (self.spool / name).unlink(missing_ok=True)
            (self.spool / INSTALL_REQUEST).unlink(missing_ok=True)
        elif isinstance(old, fw.Upload):
            self._kill(channel)
            (self.spool / old.file_name).unlink(missing_ok=True)


def security_log_name(charge_point_id: str, now: float) -> str:
    """GetLog(SecurityLog)'s file name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in charge_point_id)
    return f"security-{safe}-{stamp}.log"


async def _package_problem(path: Path) -> str | None:
    """Why ``path`` is not an ``evcp`` Debian package (dpkg-deb, unprivileged), or None.
    Without dpkg-deb on the board nothing is checked here (the installer still checks)."""
    try:
        process = await asyncio.create_subprocess_exec(
            "dpkg-deb", "--field", str(path), "Package",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except FileNotFoundError:
        return None
    out, err = await process.communicate()
    if process.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()
        return (
            f"the download is not a Debian package ({reason[-1] if reason else 'dpkg-deb failed'})"
        )
    name = out.decode(errors="replace").strip()
    if name != "evcp":
        return f"the download is the package {name[:40]!r}, not evcp"
    return None


def status_view(spool_dir: Path, version: str) -> dict[str, Any]:
    """``evcp firmware status --json``, from the persisted state (no agent needed)."""
    state = read_state(spool_dir)
    return {
        "version": version,
        "status": fw.firmware_status(state.update),
        "pending": state.update.to_json() if state.update else None,
        "last_result": state.last_result,
    }
