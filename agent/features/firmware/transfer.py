"""The transfer helper: one download, one upload or one diagnostics bundle, in its own process.

The charging agent runs ``python -m agent.features.firmware.transfer ...`` and waits for it, so
the buffers, TLS state and compression of a 20 MB transfer live and die in a short-lived
process and never raise the agent's resident memory. Standard library only (urllib, ftplib,
ssl, tarfile): no ``ocpp``, no ``agent`` imports beyond this package.

Every run prints exactly one JSON line on stdout, ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "retryable": bool}``, and exits with:

* 0 done;
* 1 failed, worth retrying (network error, a cut transfer, a 5xx, a 404 that may appear);
* 3 refused for good (a scheme that is not allowed or not supported, a malformed location);
* 2 bad command line (argparse).

Downloads resume: bytes arrive in ``DEST.part`` (with ``DEST.part.json`` holding the URL and
the server's ETag/Last-Modified); the next run asks for the rest (HTTP ``Range`` with
``If-Range``, FTP ``REST``) and renames the part to ``DEST`` once complete.
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

CHUNK = 64 * 1024
EXIT_OK = 0
EXIT_RETRY = 1
EXIT_REFUSED = 3

USER_AGENT = "evcp-transfer"


class TransferError(Exception):
    """``status``: the GetLog LogStatusNotification a refusal maps to (BadMessage,
    NotSupportedOperation, PermissionDenied), None for an ordinary failure."""

    def __init__(self, message: str, *, retryable: bool, status: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def _check_scheme(url: str, allow_http: bool) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise TransferError(
            f"malformed location: {exc}", retryable=False, status="BadMessage"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http", "ftp", "ftps") or not parts.hostname:
        raise TransferError(
            f"unsupported location {scheme or '(no scheme)'}://: use https, ftps, or (if"
            " [firmware] allow_http) http or ftp",
            retryable=False,
            status="BadMessage" if not scheme or not parts.hostname else "NotSupportedOperation",
        )
    if scheme in ("http", "ftp") and not allow_http:
        raise TransferError(
            f"{scheme}:// is not allowed ([firmware] allow_http = false)",
            retryable=False,
            status="NotSupportedOperation",
        )
    return scheme


def _describe(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({reason.verify_message})"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return f"{type(exc).__name__}: {exc}"


def _tls(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# --- download


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path, url: str) -> dict[str, Any]:
    """The validators of a partial download of ``url``; a part of another URL is dropped."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(_meta_path(part).read_text())
    if meta.get("url") != url:
        part.unlink(missing_ok=True)
        return {"url": url}
    return meta


def _write_meta(part: Path, meta: dict[str, Any]) -> None:
    _meta_path(part).write_text(json.dumps(meta))


def _append(stream: http.client.HTTPResponse, part: Path, offset: int) -> int:
    """Copy ``stream`` into ``part`` from ``offset`` on; returns the bytes written."""
    written = 0
    with open(part, "r+b" if offset else "wb") as out:
        out.seek(offset)
        out.truncate()
        while chunk := stream.read1(CHUNK):  # what has arrived: a stall keeps it on disk
            out.write(chunk)
            out.flush()
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def _http_download(
    url: str, part: Path, meta: dict[str, Any], ca_file: str | None, timeout: float
) -> tuple[int, int]:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    validator = meta.get("etag") or meta.get("last_modified")
    if offset and validator:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    elif offset:
        offset = 0  # nothing to prove the file is unchanged: start over
    request = urllib.request.Request(url, headers=headers)
    context = _tls(ca_file) if url.lower().startswith("https:") else None
    try:
        response = urllib.request.urlopen(request, timeout=timeout, context=context)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            part.unlink(missing_ok=True)  # the file changed size: next attempt starts over
        raise TransferError(f"HTTP {exc.code} {exc.reason}", retryable=True) from None
    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink(missing_ok=True)
                raise TransferError("the server answered another range", retryable=True)
        else:
            offset = 0
        meta.update(
            etag=response.headers.get("ETag"), last_modified=response.headers.get("Last-Modified")
        )
        _write_meta(part, meta)
        expected = response.headers.get("Content-Length")
        try:
            written = _append(response, part, offset)
        except (OSError, http.client.HTTPException) as exc:
            done = part.stat().st_size if part.exists() else 0
            raise TransferError(
                f"download cut at {done} bytes: {type(exc).__name__}", retryable=True
            ) from None
        if expected is not None and written < int(expected):
            raise TransferError(
                f"download cut: {offset + written} of {offset + int(expected)} bytes",
                retryable=True,
            )
    return offset, offset + written


def _content_range_start(value: str) -> int:
    # "bytes 1000-1999/2000"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _ftp_connect(url: str, ca_file: str | None, timeout: float) -> tuple[ftplib.FTP, str]:
    parts = urlsplit(url)
    secure = parts.scheme.lower() == "ftps"
    ftp: ftplib.FTP
    if secure:
        ftp = ftplib.FTP_TLS(context=_tls(ca_file), timeout=timeout)
    else:
        ftp = ftplib.FTP(timeout=timeout)
    ftp.connect(parts.hostname or "", parts.port or 21)
    ftp.login(unquote(parts.username or "anonymous"), unquote(parts.password or "evcp@"))
    if isinstance(ftp, ftplib.FTP_TLS):
        ftp.prot_p()
    ftp.voidcmd("TYPE I")
    return ftp, unquote(parts.path)


def _ftp_download(
    url: str, part: Path, meta: dict[str, Any], ca_file: str | None, timeout: float
) -> tuple[int, int]:
    try:
        ftp, path = _ftp_connect(url, ca_file, timeout)
    except ftplib.error_perm as exc:
        raise TransferError(f"FTP refused: {exc}", retryable=True) from None
    with ftp:
        try:
            size = ftp.size(path)
        except ftplib.error_perm:
            size = None
        if size is not None and meta.get("size") not in (None, size):
            part.unlink(missing_ok=True)  # another file now: start over
        meta["size"] = size
        _write_meta(part, meta)
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return offset, offset
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            try:
                ftp.retrbinary(f"RETR {path}", out.write, blocksize=CHUNK, rest=offset or None)
            except ftplib.error_perm as exc:
                raise TransferError(f"FTP refused: {exc}", retryable=True) from None
            finally:
                out.flush()
                os.fsync(out.fileno())
        total = part.stat().st_size
        if size is not None and total < size:
            raise TransferError(f"download cut: {total} of {size} bytes", retryable=True)
        return offset, total


def download(
    url: str, dest: Path, *, ca_file: str | None, allow_http: bool, timeout: float
) -> dict[str, Any]:
    scheme = _check_scheme(url, allow_http)
    part = dest.with_name(dest.name + ".part")
    meta = _read_meta(part, url)
    try:
        if scheme in ("http", "https"):
            resumed_from, size = _http_download(url, part, meta, ca_file, timeout)
        else:
            resumed_from, size = _ftp_download(url, part, meta, ca_file, timeout)
    except (OSError, EOFError, ftplib.Error, http.client.HTTPException) as exc:
        raise TransferError(_describe(exc), retryable=True) from None
    os.replace(part, dest)
    _meta_path(part).unlink(missing_ok=True)
    return {"ok": True, "file": str(dest), "bytes": size, "resumed_from": resumed_from}


# --- upload


def _multipart(file: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield tail

    return body(), len(head) + file.stat().st_size + len(tail)


def _http_upload(url: str, file: Path, method: str, ca_file: str | None, timeout: float) -> str:
    headers = {"User-Agent": USER_AGENT}
    if method == "put":
        parts = urlsplit(url)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        url = urlunsplit(parts._replace(path=path + quote(file.name)))
        headers["Content-Type"] = "application/gzip"
        headers["Content-Length"] = str(file.stat().st_size)
        data: Any = open(file, "rb")  # noqa: SIM115 - closed below
    else:
        boundary = uuid.uuid4().hex
        data, length = _multipart(file, boundary)
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        headers["Content-Length"] = str(length)
    request = urllib.request.Request(url, data=data, headers=headers, method=method.upper())
    context = _tls(ca_file) if url.lower().startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # retrying will not grant it
            raise TransferError(
                f"HTTP {exc.code} {exc.reason}", retryable=False, status="PermissionDenied"
            ) from None
        raise TransferError(f"HTTP {exc.code} {exc.reason}", retryable=True) from None
    finally:
        if hasattr(data, "close"):
            data.close()
    return url


def _ftp_upload(url: str, file: Path, ca_file: str | None, timeout: float) -> str:
    ftp, path = _ftp_connect(url, ca_file, timeout)
    with ftp:
        if path.strip("/"):
            ftp.cwd(path)
        with open(file, "rb") as f:
            ftp.storbinary(f"STOR {file.name}", f, blocksize=CHUNK)
    return url.rstrip("/") + "/" + file.name


def upload(
    url: str, file: Path, *, method: str, ca_file: str | None, allow_http: bool, timeout: float
) -> dict[str, Any]:
    """Upload ``file`` into the location (a directory, OCPP 1.6 GetDiagnostics.req)."""
    scheme = _check_scheme(url, allow_http)
    try:
        if scheme in ("http", "https"):
            target = _http_upload(url, file, method, ca_file, timeout)
        else:
            target = _ftp_upload(url, file, ca_file, timeout)
    except ftplib.error_perm as exc:
        if str(exc).startswith("530"):  # not logged in
            raise TransferError(
                f"FTP refused: {exc}", retryable=False, status="PermissionDenied"
            ) from None
        raise TransferError(_describe(exc), retryable=True) from None
    except (OSError, EOFError, ftplib.Error, http.client.HTTPException) as exc:
        raise TransferError(_describe(exc), retryable=True) from None
    return {"ok": True, "target": target, "bytes": file.stat().st_size}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.features.firmware.transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "upload"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--ca-file", default="")
        p.add_argument("--allow-http", action="store_true")
        p.add_argument("--timeout", type=float, default=60.0)
        if name == "download":
            p.add_argument("--dest", required=True, type=Path)
        else:
            p.add_argument("--file", required=True, type=Path)
            p.add_argument("--method", choices=("put", "post"), default="put")
    p = sub.add_parser("bundle")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--state-db", required=True, type=Path)
    p.add_argument("--status-json", required=True, type=Path)
    p.add_argument("--since", type=float, default=None)
    p.add_argument("--until", type=float, default=None)
    p.add_argument("--unit", default="evcp")
    p.add_argument("--journalctl", default="journalctl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "download":
            result = download(
                args.url,
                args.dest,
                ca_file=args.ca_file,
                allow_http=args.allow_http,
                timeout=args.timeout,
            )
        elif args.command == "upload":
            result = upload(
                args.url,
                args.file,
                method=args.method,
                ca_file=args.ca_file,
                allow_http=args.allow_http,
                timeout=args.timeout,
            )
        else:
            from agent.features.firmware.diagnostics import build_bundle

            result = build_bundle(
                args.out,
                config=args.config,
                state_db=args.state_db,
                status_json=args.status_json,
                since=args.since,
                until=args.until,
                unit=args.unit,
                journalctl=args.journalctl,
            )
    except TransferError as exc:
        failure: dict[str, Any] = {"ok": False, "error": str(exc), "retryable": exc.retryable}
        if exc.status is not None:
            failure["log_status"] = exc.status
        print(json.dumps(failure))
        return EXIT_RETRY if exc.retryable else EXIT_REFUSED
    print(json.dumps(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
