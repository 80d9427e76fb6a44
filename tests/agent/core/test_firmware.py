"""The firmware update and diagnostics upload rules (agent.core.firmware), table by table.

Each row is a scenario a CSMS would see: the events fed in and the statuses sent out, in
order. The whole run is checked, so a status sent twice, late or out of spec order fails.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.core import firmware as fw

URL = "https://fw.example/evcp_0.2.0_all.deb"


def run(events: list[Any], update: fw.Update | None = None) -> tuple[Any, list[Any]]:
    actions: list[Any] = []
    for ev in events:
        update, out = fw.step(update, ev)
        actions.extend(out)
    return update, actions


def statuses(actions: list[Any]) -> list[str]:
    return [a.status for a in actions if isinstance(a, fw.SendStatus)]


def req(now: float = 100.0, at: float = 0.0, attempts: int = 3, interval: float = 30) -> Any:
    return fw.Requested(URL, at, attempts, interval, now)


IDLE = fw.ConnectorsIdle("0.1.0", 600, 200)

SCENARIOS = [
    # (name, events, expected statuses, expected final state or None, last result prefix)
    (
        "happy path: Downloading, Downloaded, Installing, Installed on the new version's boot",
        [req(), fw.DownloadOk("u.deb", 110), IDLE, fw.BootAccepted("0.2.0", 300)],
        ["Downloading", "Downloaded", "Installing", "Installed"],
        None,
        "Installed 0.2.0",
    ),
    (
        "the old version booting again is not Installed",
        [req(), fw.DownloadOk("u.deb", 110), IDLE, fw.BootAccepted("0.1.0", 300)],
        ["Downloading", "Downloaded", "Installing"],
        fw.FwState.INSTALLING,
        None,
    ),
    (
        "rolled back: the old version reports InstallationFailed",
        [
            req(),
            fw.DownloadOk("u.deb", 110),
            IDLE,
            fw.InstallerFailed("rolled back: no BootNotification Accepted", 900),
        ],
        ["Downloading", "Downloaded", "Installing", "InstallationFailed"],
        None,
        "InstallationFailed: rolled back",
    ),
    (
        "installer never reports: InstallationFailed at the deadline, not before",
        [req(), fw.DownloadOk("u.deb", 110), IDLE, fw.Tick(799), fw.Tick(800)],
        ["Downloading", "Downloaded", "Installing", "InstallationFailed"],
        None,
        "InstallationFailed: the installer did not report",
    ),
    (
        "three attempts then DownloadFailed (retries honoured, interval honoured)",
        [
            req(attempts=3, interval=30),
            fw.DownloadError("404", True, 101),
            fw.Tick(120),  # too early: still waiting
            fw.Tick(131),
            fw.DownloadError("404", True, 132),
            fw.Tick(162),
            fw.DownloadError("404", True, 163),
        ],
        ["Downloading", "DownloadFailed"],
        None,
        "DownloadFailed after 3 attempt(s): 404",
    ),
    (
        "a refused location (http not allowed) fails at once, no retry",
        [req(attempts=5), fw.DownloadError("http:// not allowed", False, 101)],
        ["Downloading", "DownloadFailed"],
        None,
        "DownloadFailed after 1 attempt(s)",
    ),
    (
        "retrieveDate in the future: nothing until it is reached",
        [req(now=100, at=500), fw.Tick(499)],
        [],
        fw.FwState.SCHEDULED,
        None,
    ),
    (
        "retrieveDate reached: Downloading",
        [req(now=100, at=500), fw.Tick(500)],
        ["Downloading"],
        fw.FwState.DOWNLOADING,
        None,
    ),
    (
        "downloaded while charging: waits, Installing only once connectors are idle",
        [req(), fw.DownloadOk("u.deb", 110)],
        ["Downloading", "Downloaded"],
        fw.FwState.DOWNLOADED,
        None,
    ),
    (
        "a second request during installation is ignored",
        [req(), fw.DownloadOk("u.deb", 110), IDLE, req(now=250)],
        ["Downloading", "Downloaded", "Installing"],
        fw.FwState.INSTALLING,
        None,
    ),
]


@pytest.mark.parametrize(
    ("events", "expected", "state", "result"),
    [s[1:] for s in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_firmware_scenarios(
    events: list[Any], expected: list[str], state: fw.FwState | None, result: str | None
) -> None:
    update, actions = run(events)
    assert statuses(actions) == expected
    assert (update.state if update else None) is state
    finished = [a.result for a in actions if isinstance(a, fw.Finished)]
    if result is None:
        assert finished == []
    else:
        assert len(finished) == 1
        assert finished[0].startswith(result)
    # every status sent is a FirmwareStatus value
    assert set(statuses(actions)) <= set(fw.FIRMWARE_STATUSES)


def test_retries_start_a_new_attempt_each_time() -> None:
    _, actions = run(
        [req(attempts=2, interval=10), fw.DownloadError("cut", True, 101), fw.Tick(111)]
    )
    assert [a.attempt for a in actions if isinstance(a, fw.StartDownload)] == [1, 2]
    assert fw.WakeAt(111) in actions


def test_charging_is_blocked_only_while_installing() -> None:
    _, actions = run([req(), fw.DownloadOk("u.deb", 110), IDLE, fw.BootAccepted("0.2.0", 300)])
    blocks = [a.blocked for a in actions if isinstance(a, fw.BlockCharging)]
    assert blocks == [True, False]
    # the installer is given the file only after Installing is announced and charging blocked
    kinds = [type(a).__name__ for a in actions]
    assert kinds.index("HandToInstaller") > kinds.index("BlockCharging")
    assert fw.HandToInstaller("u.deb") in actions


@pytest.mark.parametrize(
    ("state_events", "resume_action"),
    [
        ([req()], fw.StartDownload(1)),
        ([req(now=100, at=500)], fw.WakeAt(500)),
        ([req(), fw.DownloadOk("u.deb", 110)], fw.WaitForIdle()),
        ([req(), fw.DownloadOk("u.deb", 110), IDLE], fw.BlockCharging(True)),
    ],
    ids=["mid-download", "scheduled", "downloaded", "installing"],
)
def test_a_restart_carries_on_from_the_persisted_record(
    state_events: list[Any], resume_action: Any
) -> None:
    update, _ = run(state_events)
    assert update is not None
    restored = fw.Update.from_json(update.to_json())
    assert restored == update
    again, actions = fw.step(restored, fw.Resumed(150))
    assert again == restored
    assert resume_action in actions
    assert statuses(actions) == []  # a restart does not repeat a status


def test_a_new_request_replaces_a_pending_download() -> None:
    update, actions = run([req(), fw.DownloadError("cut", True, 101), req(now=120)])
    assert update is not None and update.attempt == 1
    assert fw.Discard() in actions


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([], "Idle"),
        ([req(now=100, at=500)], "Idle"),
        ([req()], "Downloading"),
        ([req(), fw.DownloadError("cut", True, 101)], "Downloading"),
        ([req(), fw.DownloadOk("u.deb", 110)], "Downloaded"),
        ([req(), fw.DownloadOk("u.deb", 110), IDLE], "Installing"),
        ([req(), fw.DownloadOk("u.deb", 110), IDLE, fw.BootAccepted("0.2.0", 300)], "Idle"),
    ],
)
def test_triggered_firmware_status(events: list[Any], status: str) -> None:
    update, _ = run(events)
    assert fw.firmware_status(update) == status


def test_events_out_of_place_change_nothing() -> None:
    update, _ = run([req()])
    again, actions = fw.step(update, fw.BootAccepted("0.2.0", 200))
    assert again == update
    assert [type(a) for a in actions] == [fw.Ignored]
    assert fw.step(None, fw.Tick(1)) == (None, [fw.Ignored("Tick with no update pending")])


def ureq(attempts: int = 2) -> fw.UploadRequested:
    return fw.UploadRequested("ftp://h/d/", "diag.tar.gz", None, None, attempts, 20, 100)


@pytest.mark.parametrize(
    ("events", "expected", "result"),
    [
        ([ureq(), fw.UploadOk(105)], ["Uploading", "Uploaded"], "Uploaded diag.tar.gz"),
        (
            [ureq(2), fw.UploadError("refused", True, 101), fw.Tick(121), fw.UploadOk(125)],
            ["Uploading", "Uploaded"],
            "Uploaded",
        ),
        (
            [ureq(2), fw.UploadError("x", True, 101), fw.Tick(121), fw.UploadError("x", True, 122)],
            ["Uploading", "UploadFailed"],
            "UploadFailed after 2 attempt(s)",
        ),
        (
            [ureq(5), fw.UploadError("bad url", False, 101)],
            ["Uploading", "UploadFailed"],
            "UploadFailed after 1",
        ),
    ],
    ids=["uploaded", "retried-then-uploaded", "failed-after-retries", "not-retryable"],
)
def test_diagnostics_scenarios(events: list[Any], expected: list[str], result: str) -> None:
    upload: fw.Upload | None = None
    actions: list[Any] = []
    for ev in events:
        upload, out = fw.step_upload(upload, ev)
        actions.extend(out)
    assert statuses(actions) == expected
    assert set(expected) <= set(fw.DIAGNOSTICS_STATUSES)
    assert upload is None
    assert fw.diagnostics_status(upload) == "Idle"
    (finished,) = [a.result for a in actions if isinstance(a, fw.Finished)]
    assert finished.startswith(result)


def test_diagnostics_upload_survives_a_restart() -> None:
    upload, _ = fw.step_upload(None, ureq())
    assert fw.diagnostics_status(upload) == "Uploading"
    assert upload is not None
    restored = fw.Upload.from_json(upload.to_json())
    _, actions = fw.step_upload(restored, fw.Resumed(200))
    assert actions == [fw.StartUpload(1)]


# --- SignedUpdateFirmware and GetLog (security whitepaper)


def signed(now: float = 100.0, at: float = 0.0) -> Any:
    return fw.Requested(
        URL, at, 1, 30, now, request_id=7, signature="c2ln", signing_certificate="PEM"
    )


def test_a_signed_update_is_verified_before_it_may_install() -> None:
    update, actions = run([signed(), fw.DownloadOk("u.deb", 110)])
    assert statuses(actions) == ["Downloading", "Downloaded"]
    assert isinstance(actions[-1], fw.VerifySignature)  # no WaitForIdle before the check
    # Connectors idle before the check has ended: nothing is handed over.
    same, out = fw.step(update, IDLE)
    assert same == update and isinstance(out[0], fw.Ignored)
    update, out = fw.step(update, fw.SignatureChecked("SignatureVerified", "", 120))
    assert statuses(out) == ["SignatureVerified"] and isinstance(out[-1], fw.WaitForIdle)
    assert fw.signed_firmware_status(update) == "SignatureVerified"
    assert fw.firmware_status(update) == "Downloaded"  # the plain message has no such value
    update, out = fw.step(update, IDLE)
    assert statuses(out) == ["Installing"] and any(isinstance(a, fw.HandToInstaller) for a in out)


@pytest.mark.parametrize(
    ("checked", "sent"),
    [("InvalidSignature", "InvalidSignature"), ("InvalidCertificate", "InvalidSignature")],
)
def test_a_bad_signature_ends_the_update_and_discards_the_file(checked: str, sent: str) -> None:
    update, actions = run(
        [signed(), fw.DownloadOk("u.deb", 110), fw.SignatureChecked(checked, "why", 120)]
    )
    assert update is None
    assert statuses(actions) == ["Downloading", "Downloaded", sent]
    assert sent in fw.SIGNED_FIRMWARE_STATUSES
    assert any(isinstance(a, fw.Discard) for a in actions)
    assert not any(isinstance(a, fw.HandToInstaller | fw.WaitForIdle) for a in actions)


def test_a_restart_during_the_signature_check_checks_again() -> None:
    update, _ = run([signed(), fw.DownloadOk("u.deb", 110)])
    restored = fw.Update.from_json(update.to_json())
    assert restored == update
    _, out = fw.step(restored, fw.Resumed(500))
    assert out == [fw.VerifySignature("u.deb")]


def test_a_signed_update_in_the_future_is_download_scheduled() -> None:
    update, actions = run([signed(now=100, at=1000)])
    assert statuses(actions) == ["DownloadScheduled"]
    assert fw.signed_firmware_status(update) == "DownloadScheduled"


def log_request(kind: str = fw.SECURITY_LOG, attempts: int = 2) -> fw.UploadRequested:
    return fw.UploadRequested(URL, "f.log", None, None, attempts, 30, 100, kind=kind, request_id=4)


@pytest.mark.parametrize(
    ("error", "sent"),
    [
        (fw.UploadError("cut", True, 110), None),  # retried
        (fw.UploadError("refused", False, 110, log_status="PermissionDenied"), "PermissionDenied"),
        (fw.UploadError("bad", False, 110, log_status="BadMessage"), "BadMessage"),
        (fw.UploadError("gone", False, 110), "UploadFailure"),
    ],
)
def test_get_log_failures(error: fw.UploadError, sent: str | None) -> None:
    upload, _ = fw.step_upload(None, log_request())
    assert upload is not None and upload.is_log
    upload, out = fw.step_upload(upload, error)
    if sent is None:
        assert upload is not None and fw.log_status(upload) == "Uploading"
        assert statuses(out) == []
    else:
        assert upload is None and statuses(out) == [sent]
        assert sent in fw.LOG_STATUSES


def test_get_diagnostics_keeps_its_own_failure_status() -> None:
    upload, _ = fw.step_upload(None, log_request(kind=fw.DIAGNOSTICS, attempts=1))
    _, out = fw.step_upload(upload, fw.UploadError("gone", False, 110))
    assert statuses(out) == ["UploadFailed"]
