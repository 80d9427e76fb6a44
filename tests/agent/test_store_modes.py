"""State files are never readable by other users, whatever the umask: the state database
and its WAL, the stage and its WAL, and the directories the store creates. Files are 0640
and directories 0750 (the ``evcp`` group may read them), set by the store itself, on real
SQLite files, checked after writes (SQLite creates the WAL later than the file)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    before = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(before)


def modes(top: Path) -> dict[str, str]:
    """Every file and directory under ``top`` (not ``top`` itself): its permission bits."""
    return {str(p.relative_to(top)): oct(stat.S_IMODE(p.stat().st_mode)) for p in top.rglob("*")}


def mv(n: int) -> dict[str, object]:
    return {"connectorId": 1, "transactionId": 0, "n": n,
            "meterValue": [{"timestamp": f"2026-01-01T00:00:{n:02d}Z",
                            "sampledValue": [{"value": str(n)}]}]}  # fmt: skip


def test_new_state_and_stage_files_and_directories_are_private(tmp_path: Path, umask: int) -> None:
    store = Store.open(tmp_path / "lib" / "evcp")
    store.stage(tmp_path / "run" / "evcp" / "stage.db", 300)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None,
                                    start_payload={"n": "start"})  # fmt: skip
    store.enqueue("MeterValues", mv(1), local)  # staged: the stage's WAL is written
    store.put("k", "v")  # the state file's WAL is written
    seen = modes(tmp_path)
    assert {"lib/evcp/evcp.db-wal", "run/evcp/stage.db-wal"} <= seen.keys()  # (written)
    assert seen == {
        "lib": "0o750",
        "lib/evcp": "0o750",
        "run": "0o750",
        "run/evcp": "0o750",
        **{name: "0o640" for name in seen if "evcp/" in name and "." in name},
    }
    store.close()
    assert all(mode in ("0o640", "0o750") for mode in modes(tmp_path).values())


def test_a_state_directory_that_exists_keeps_its_mode(tmp_path: Path, umask: int) -> None:
    """(systemd's StateDirectory= made it, with the mode the unit asks for.)"""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    store = Store.open(state)
    store.put("k", "v")
    store.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o755
    assert set(modes(state).values()) == {"0o640"}


def test_state_files_an_older_version_left_readable_are_made_private(tmp_path: Path) -> None:
    crash = (f"import os; from pathlib import Path; from agent.store import Store;"
             f" Store.open(Path({str(tmp_path)!r})).put('k', 'v'); os._exit(0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr  # (a crash: the WAL is left beside the file)
    for name in ("evcp.db", "evcp.db-wal"):
        os.chmod(tmp_path / name, 0o644)  # what SQLite makes under umask 022
    store = Store.open(tmp_path)
    assert store.get("k") == "v"
    assert modes(tmp_path) == {"evcp.db": "0o640", "evcp.db-wal": "0o640"}
    store.close()


def test_a_corrupt_file_moved_aside_is_private(tmp_path: Path, umask: int) -> None:
    (tmp_path / "evcp.db").write_bytes(b"this is not a database" * 100)
    os.chmod(tmp_path / "evcp.db", 0o644)
    store = Store.open(tmp_path)
    store.put("k", "v")
    seen = modes(tmp_path)
    assert any(name.startswith("evcp.db.corrupt-") for name in seen), seen
    assert set(seen.values()) == {"0o640"}, seen
    store.close()


def test_a_stage_moved_aside_and_a_new_one_are_private(tmp_path: Path, umask: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage.db").write_bytes(b"garbage" * 500)
    os.chmod(run / "stage.db", 0o644)
    store = Store.open(tmp_path / "state")
    store.stage(run / "stage.db", 300)
    local = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0,
                                    start_ts="t0", reservation_id=None,
                                    start_payload={"n": "start"})  # fmt: skip
    store.enqueue("MeterValues", mv(1), local)
    assert store.storage_status()["stage"] == str(run / "stage.db")
    seen = modes(run)
    assert any(name.startswith("stage.db.aside-") for name in seen), seen
    assert "stage.db-wal" in seen
    assert set(seen.values()) == {"0o640"}, seen
    store.close()


def test_a_state_file_written_after_a_full_disk_is_private(tmp_path: Path) -> None:
    """No state file can be written at start (RLIMIT_FSIZE 0, as a full disk): the store
    runs in memory, and the file it writes once the disk takes writes is private too."""
    state = tmp_path / "state"
    script = textwrap.dedent(
        f"""
        import json, os, resource, signal, stat
        from pathlib import Path
        os.umask(0o022)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        from agent.store import Store
        Store.disk_retry_s = 0.0
        store = Store.open(Path({str(state)!r}))
        before = store.storage_status()["on_disk"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        store.put("after", "2")
        after = store.storage_status()["on_disk"]
        files = {{p.name: oct(stat.S_IMODE(p.stat().st_mode))
                 for p in Path({str(state)!r}).iterdir()}}
        print(json.dumps([before, after, files]))
        store.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after, files = json.loads(done.stdout)
    assert (before, after) == (False, True)
    assert "evcp.db-wal" in files
    assert set(files.values()) == {"0o640"}, files
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
