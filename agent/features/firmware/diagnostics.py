"""The GetDiagnostics bundle: one tar.gz a CSMS operator can read without a truck roll.

Built by the transfer helper process (``transfer bundle``), never in the agent, so that
compressing a week of journal costs the agent no memory. Contents, under one folder named
after the file:

* ``journal.txt``: ``journalctl -u <unit> --since --until -o short-iso`` for the window the
  CSMS asked (all of it when it gave none); when journalctl is missing, fails or has nothing
  in the window, the file says so instead;
* ``config.json``: the configuration file, parsed, with every secret replaced by
  ``"<redacted>"`` (the Basic Auth password, AuthorizationKey, anything named like a
  password, secret, token or key material); a file that does not parse is left out, with the
  reason, rather than copied raw;
* ``status.json``: the agent's status and queue summary, as the caller passed it;
* ``integrity.txt``: ``PRAGMA integrity_check`` of the state database opened read-only.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
_SECRET_WORDS = ("password", "authorizationkey", "secret", "token", "private")


def _is_secret(key: str) -> bool:
    low = key.lower()
    return any(word in low for word in _SECRET_WORDS)


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def bundle_name(charge_point_id: str, now: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in charge_point_id)
    return f"diagnostics-{safe}-{stamp}.tar.gz"


def _journal(
    path: Path, unit: str, since: float | None, until: float | None, journalctl: str
) -> int:
    """Write the journal for the window into ``path``; returns its lines (0: a note instead)."""
    command = [journalctl, "-u", unit, "-o", "short-iso", "--no-pager", "-q"]
    if since is not None:
        command.append(f"--since=@{int(since)}")
    if until is not None:
        command.append(f"--until=@{int(until) + 1}")
    note = None
    try:
        with open(path, "wb") as out:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.PIPE, timeout=300, check=False
            )
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            note = f"journalctl failed (exit status {done.returncode}): {err}"
    except FileNotFoundError:
        note = f"journalctl not found ({journalctl}): no journal on this system"
    except subprocess.TimeoutExpired:
        note = "journalctl did not finish within 300 s"
    lines = 0
    if note is None:
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        if lines == 0:
            note = f"the journal has no entries of {unit} in this window"
    if note is not None:
        window = f"since {since}, until {until} (seconds since the epoch, UTC)"
        path.write_text(f"NO JOURNAL: {note}\ncommand: {' '.join(command)}\nwindow: {window}\n")
        return 0
    return lines


def _config(path: Path) -> str:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return json.dumps({"error": f"{path}: not included ({type(exc).__name__}: {exc})"})
    return json.dumps({"file": str(path), "config": redact(data)}, indent=2)


def integrity(state_db: Path) -> str:
    if not state_db.exists():
        return f"no state database at {state_db}"
    try:
        con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("PRAGMA integrity_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"{state_db}: integrity check could not run: {exc}"
    return f"{state_db}: " + "\n".join(str(r[0]) for r in rows)


def build_bundle(
    out: Path,
    *,
    config: Path,
    state_db: Path,
    status_json: Path,
    since: float | None,
    until: float | None,
    unit: str = "evcp",
    journalctl: str = "journalctl",
) -> dict[str, Any]:
    folder = out.name.removesuffix(".tar.gz")
    journal = out.with_name(out.name + ".journal.tmp")
    partial = out.with_name(out.name + ".tmp")
    started = time.monotonic()
    try:
        lines = _journal(journal, unit, since, until, journalctl)
        try:
            status = status_json.read_text()
        except OSError as exc:
            status = json.dumps({"error": f"no status summary: {exc}"})
        try:
            checked = json.loads(status).get("database_integrity")
        except (ValueError, AttributeError):
            checked = None
        # The agent holds the database's lock: it checks it itself and passes the result
        # (opening it here would wait for the lock); the file is read here only without it.
        integrity_text = f"{state_db}: {checked}" if checked else integrity(state_db)
        import tarfile  # (here: the agent imports this module for bundle_name only)

        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            tar.add(journal, arcname=f"{folder}/journal.txt")
            for name, text in (
                ("config.json", _config(config)),
                ("status.json", status),
                ("integrity.txt", integrity_text + "\n"),
            ):
                data = text.encode()
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                info.mtime = int(time.time())
                info.mode = 0o640
                tar.addfile(info, io.BytesIO(data))
        os.replace(partial, out)
    finally:
        journal.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return {
        "ok": True,
        "file": str(out),
        "bytes": out.stat().st_size,
        "journal_lines": lines,
        "seconds": round(time.monotonic() - started, 3),
    }
