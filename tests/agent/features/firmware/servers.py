"""Real file servers on loopback for the firmware tests and the benchmark.

* :class:`FileServer`: HTTP or HTTPS (a trustme certificate), serving named byte strings with
  ``Range``/``If-Range`` and an ETag, receiving PUT and multipart POST uploads, and able to
  cut a response halfway (``cut_next``) or answer 404 (missing files) or garbage.
* :class:`FtpServer`: pyftpdlib on 127.0.0.1 with one user and a home folder.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer


@dataclass
class Received:
    method: str
    path: str
    body: bytes
    filename: str | None = None


@dataclass
class FileState:
    files: dict[str, bytes] = field(default_factory=dict)
    #: cut the next N GET responses after this many body bytes
    cut_after: int | None = None
    cut_count: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[Received] = field(default_factory=list)
    upload_status: int = 201
    #: send this many body bytes of the next GET, then stall until ``release`` is set
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FileState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        with st.lock:
            st.requests.append(
                {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "if_range": self.headers.get("If-Range"),
                    "at": time.time(),
                }
            )
            cut = st.cut_after if st.cut_count > 0 else None
            if cut is not None:
                st.cut_count -= 1
            hold, st.hold_after = st.hold_after, None
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404, "no such firmware")
            return
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", etag) == etag and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/vnd.debian.binary-package")
        self.end_headers()
        if hold is not None:
            self.wfile.write(body[:hold])
            self.wfile.flush()
            st.release.wait(60)
            self.close_connection = True
            return
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True  # the server closes the socket: the client sees EOF
            return
        view = memoryview(body)
        for i in range(0, len(body), 256 * 1024):
            self.wfile.write(view[i : i + 256 * 1024])

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length)

    def do_PUT(self) -> None:
        body = self._body()
        with self.state.lock:
            self.state.uploads.append(Received("PUT", self.path, body))
        self._answer_upload()

    def do_POST(self) -> None:
        body = self._body()
        raw = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        for part in message.iter_parts():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            with self.state.lock:
                self.state.uploads.append(
                    Received("POST", self.path, payload, filename=part.get_filename())
                )
        self._answer_upload()

    def _answer_upload(self) -> None:
        self.send_response(self.state.upload_status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer:
    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.state = FileState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if context is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


USER, PASSWORD = "fw", "ftp-secret"


@contextmanager
def ftp_server(home: Path, tls_cert: Path | None = None) -> Iterator[str]:
    """A pyftpdlib server on 127.0.0.1; yields ftp://fw:ftp-secret@127.0.0.1:PORT, or with
    ``tls_cert`` (a PEM with key and chain) explicit FTPS requiring TLS on control and data
    connections, yielding ftps://..."""
    authorizer = DummyAuthorizer()
    authorizer.add_user(USER, PASSWORD, str(home), perm="elradfmwMT")
    base: type[FTPHandler] = FTPHandler
    attrs: dict[str, object] = {"authorizer": authorizer, "banner": "test"}
    if tls_cert is not None:
        from pyftpdlib.handlers import TLS_FTPHandler

        base = TLS_FTPHandler
        attrs.update(certfile=str(tls_cert), tls_control_required=True, tls_data_required=True)
    handler = type("Handler", (base,), attrs)
    server = ThreadedFTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"timeout": 0.2, "blocking": True}, daemon=True
    )
    thread.start()
    try:
        scheme = "ftps" if tls_cert is not None else "ftp"
        yield f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{server.address[1]}"
    finally:
        server.close_all()
        thread.join(10)
