"""The CSMS and the firmware file server *inside* the booted package root (its own network
namespace: systemd-nspawn --private-network), run by a copy of the package's venv.

    python csms_in_root.py DIR PORT FILE_PORT CP_ID PASSWORD

DIR holds ``server.pem`` (certificate + key for localhost) and ``files/`` (served over HTTPS
on FILE_PORT). The CSMS (agent.ocpp.csms, the project's test CSMS) listens on PORT; it
writes what it received to ``DIR/received.json`` (rewritten atomically, a list of
``[action, payload]``), and sends UpdateFirmware for every ``DIR/command.json``
(``{"location": ...}``) that appears (removed once sent).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import ssl
import sys
import threading
from pathlib import Path

from ocpp.v16 import call

from agent.ocpp.csms import Csms


def serve_files(directory: Path, port: int, ctx: ssl.SSLContext) -> None:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(directory), **kw)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()


async def main() -> None:
    here, port, file_port, cp_id, password = sys.argv[1:6]
    base = Path(here)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(base / "server.pem")
    serve_files(base / "files", int(file_port), ctx)
    csms = Csms(passwords={cp_id: password})
    await csms.start(ctx, port=int(port))
    command = base / "command.json"
    written = -1
    while True:
        if len(csms.received) != written:
            written = len(csms.received)
            data = [[m.action, m.payload] for m in csms.received]
            tmp = base / "received.json.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, base / "received.json")
        if command.exists() and csms.connected(cp_id):
            location = json.loads(command.read_text())["location"]
            command.unlink()
            update = call.UpdateFirmware(location=location, retrieve_date="2020-01-01T00:00:00Z")
            await csms.call(cp_id, update)
        await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main())
