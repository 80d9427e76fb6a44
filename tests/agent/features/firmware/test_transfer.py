"""The transfer helper process against real servers on loopback: HTTPS with a trustme CA,
a server that cuts the download halfway (resumed with Range), pyftpdlib for FTP RETR/REST
and STOR, HTTP PUT and multipart POST uploads, and the refusals (http:// not allowed, 404).

Every test runs the real command, ``python -m agent.features.firmware.transfer``, as the
agent does, and checks its exit status, its one JSON line and the bytes on disk/at the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.agent.features.firmware.servers import FileServer, ftp_server
from tests.conftest import server_context

ROOT = Path(__file__).resolve().parents[4]
PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


def helper(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "agent.features.firmware.transfer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    return done.returncode, json.loads(lines[0])


@pytest.fixture
def https(ca: trustme.CA) -> Any:
    with FileServer(server_context(ca)) as server:
        server.state.files["/evcp_0.2.0_all.deb"] = PAYLOAD
        yield server


def test_https_download_with_the_configured_ca(
    https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "update.deb"
    code, out = helper("download", "--url", https.url("/evcp_0.2.0_all.deb"),
                       "--dest", str(dest), "--ca-file", str(ca_file))  # fmt: skip
    assert code == 0, out
    assert dest.read_bytes() == PAYLOAD
    assert out == {"ok": True, "file": str(dest), "bytes": len(PAYLOAD), "resumed_from": 0}
    assert not list(tmp_path.glob("*.part*"))


def test_https_download_refuses_an_unknown_ca(https: FileServer, tmp_path: Path) -> None:
    # no --ca-file: the system store does not know the test CA
    code, out = helper("download", "--url", https.url("/evcp_0.2.0_all.deb"),
                       "--dest", str(tmp_path / "u.deb"))  # fmt: skip
    assert code == 1
    assert out["ok"] is False and "TLS" in out["error"]
    assert not (tmp_path / "u.deb").exists()


def test_a_cut_download_resumes_with_range(
    https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "update.deb"
    url = https.url("/evcp_0.2.0_all.deb")
    half = len(PAYLOAD) // 2
    https.state.cut_after, https.state.cut_count = half, 1
    code, out = helper("download", "--url", url, "--dest", str(dest), "--ca-file", str(ca_file))
    assert code == 1 and out["retryable"] is True, out
    assert "cut" in out["error"]
    assert not dest.exists()
    part = tmp_path / "update.deb.part"
    assert 0 < part.stat().st_size <= half
    kept = part.stat().st_size
    code, out = helper("download", "--url", url, "--dest", str(dest), "--ca-file", str(ca_file))
    assert code == 0, out
    assert out["resumed_from"] == kept
    assert dest.read_bytes() == PAYLOAD
    second = https.state.requests[-1]
    assert second["range"] == f"bytes={kept}-"
    assert second["if_range"]  # the ETag: a changed file is fetched whole, not spliced


def test_a_part_of_a_changed_file_is_not_spliced(
    https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "update.deb"
    url = https.url("/evcp_0.2.0_all.deb")
    https.state.cut_after, https.state.cut_count = 1000, 1
    assert helper("download", "--url", url, "--dest", str(dest), "--ca-file", str(ca_file))[0] == 1
    new = os.urandom(5000)
    https.state.files["/evcp_0.2.0_all.deb"] = new  # republished: another ETag
    code, out = helper("download", "--url", url, "--dest", str(dest), "--ca-file", str(ca_file))
    assert code == 0, out
    assert dest.read_bytes() == new
    assert out["resumed_from"] == 0


def test_http_is_refused_unless_allowed(tmp_path: Path) -> None:
    with FileServer() as server:
        server.state.files["/u.deb"] = b"x" * 100
        dest = tmp_path / "u.deb"
        code, out = helper("download", "--url", server.url("/u.deb"), "--dest", str(dest))
        assert code == 3 and out["retryable"] is False
        assert "allow_http" in out["error"]
        assert server.state.requests == []  # not even tried
        code, out = helper("download", "--url", server.url("/u.deb"), "--dest", str(dest),
                           "--allow-http")  # fmt: skip
        assert code == 0 and dest.read_bytes() == b"x" * 100


def test_a_missing_file_is_a_retryable_failure(
    https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    code, out = helper("download", "--url", https.url("/nope.deb"),
                       "--dest", str(tmp_path / "u.deb"), "--ca-file", str(ca_file))  # fmt: skip
    assert code == 1 and "404" in out["error"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://h/x", "https://"])
def test_unsupported_locations_are_refused(url: str, tmp_path: Path) -> None:
    code, out = helper("download", "--url", url, "--dest", str(tmp_path / "u.deb"))
    assert code == 3 and out["ok"] is False


def test_ftp_download_and_rest_resume(tmp_path: Path) -> None:
    home = tmp_path / "ftp"
    (home / "fw").mkdir(parents=True)
    (home / "fw" / "evcp.deb").write_bytes(PAYLOAD)
    with ftp_server(home) as base:
        dest = tmp_path / "spool" / "u.deb"
        dest.parent.mkdir()
        url = f"{base}/fw/evcp.deb"
        code, out = helper("download", "--url", url, "--dest", str(dest), "--allow-http")
        assert code == 0, out
        assert dest.read_bytes() == PAYLOAD
        # a cut transfer: the first 1 MiB is already in the part file
        dest.unlink()
        part = dest.with_name("u.deb.part")
        part.write_bytes(PAYLOAD[: 1 << 20])
        part.with_name("u.deb.part.json").write_text(json.dumps({"url": url, "size": len(PAYLOAD)}))
        code, out = helper("download", "--url", url, "--dest", str(dest), "--allow-http")
        assert code == 0, out
        assert out["resumed_from"] == 1 << 20
        assert dest.read_bytes() == PAYLOAD  # REST worked: not the first MiB twice


def test_ftp_needs_allow_http_for_plain_ftp(tmp_path: Path) -> None:
    code, out = helper("download", "--url", "ftp://127.0.0.1:9/x.deb",
                       "--dest", str(tmp_path / "u.deb"))  # fmt: skip
    assert code == 3 and "allow_http" in out["error"]


def test_ftp_stor_upload(tmp_path: Path) -> None:
    home = tmp_path / "ftp"
    (home / "diag").mkdir(parents=True)
    bundle = tmp_path / "diagnostics-CP-1.tar.gz"
    bundle.write_bytes(PAYLOAD[:50_000])
    with ftp_server(home) as base:
        code, out = helper("upload", "--url", f"{base}/diag/", "--file", str(bundle),
                           "--allow-http")  # fmt: skip
    assert code == 0, out
    assert (home / "diag" / bundle.name).read_bytes() == bundle.read_bytes()


@pytest.mark.parametrize("method", ["put", "post"])
def test_https_upload_put_and_post(
    method: str, https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "diagnostics-CP-1.tar.gz"
    bundle.write_bytes(PAYLOAD[:70_000])
    code, out = helper("upload", "--url", https.url("/upload/cp1"), "--file", str(bundle),
                       "--method", method, "--ca-file", str(ca_file))  # fmt: skip
    assert code == 0, out
    (got,) = https.state.uploads
    assert got.method == method.upper()
    assert got.body == bundle.read_bytes()
    if method == "put":
        assert got.path == f"/upload/cp1/{bundle.name}"
    else:
        assert got.path == "/upload/cp1" and got.filename == bundle.name


def test_a_refused_upload_is_a_retryable_failure(
    https: FileServer, ca_file: Path, tmp_path: Path
) -> None:
    https.state.upload_status = 503
    bundle = tmp_path / "d.tar.gz"
    bundle.write_bytes(b"data")
    code, out = helper("upload", "--url", https.url("/up"), "--file", str(bundle),
                       "--ca-file", str(ca_file))  # fmt: skip
    assert code == 1 and "503" in out["error"]


@pytest.fixture
def ftps_cert(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ftps.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def test_ftps_download_upload_and_an_untrusted_server(
    tmp_path: Path, ftps_cert: Path, ca_file: Path
) -> None:
    """Explicit FTPS (AUTH TLS, PROT P) with TLS required by the server on both channels."""
    home = tmp_path / "ftp"
    (home / "fw").mkdir(parents=True)
    (home / "fw" / "evcp.deb").write_bytes(PAYLOAD)
    bundle = tmp_path / "diagnostics-CP-1.tar.gz"
    bundle.write_bytes(PAYLOAD[:40_000])
    with ftp_server(home, tls_cert=ftps_cert) as base:
        dest = tmp_path / "u.deb"
        url = f"{base}/fw/evcp.deb"
        # no --allow-http needed: FTPS is encrypted
        code, out = helper("download", "--url", url, "--dest", str(dest), "--ca-file", str(ca_file))
        assert code == 0, out
        assert dest.read_bytes() == PAYLOAD
        code, out = helper("upload", "--url", f"{base}/fw/", "--file", str(bundle),
                           "--ca-file", str(ca_file))  # fmt: skip
        assert code == 0, out
        assert (home / "fw" / bundle.name).read_bytes() == bundle.read_bytes()
        code, out = helper("download", "--url", url, "--dest", str(tmp_path / "v.deb"))
        assert code == 1 and "TLS" in out["error"], out
