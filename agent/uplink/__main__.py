"""Run the uplink supervisor alone: ``python -m agent.uplink --config evcp.toml``.

For field checks and for the network-namespace tests and benchmark: no OCPP session, the
supervisor's snapshot is written (atomically, as JSON) to ``--status-file`` on every
change, and commands are read from standard input, one a line:

* ``switch NAME`` / ``auto``: force a link / end it (the result or the error is logged);
* ``call on`` / ``call off``: pretend a CALL awaits its answer (to test the move-back rule);
* ``identity``: read ICCID and IMSI from the modem now.

The snapshot gains ``"reconnects"``: the reasons the supervisor asked for a reconnect (a
recording stand-in for the OCPP session, which this runner does not have).

``--child``: the agent's own uplink process (``evcp run`` starts it with ``[uplink]``),
speaking JSON lines with the agent over standard input and output: see
:mod:`agent.uplink.child`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.config import ConfigError, load
from agent.uplink.supervisor import UplinkSupervisor


class RecordingSession:
    """Stands in for the OCPP session: records reconnect requests, reports a CALL in flight
    when told to."""

    def __init__(self) -> None:
        self.reconnects: list[str] = []
        self.in_flight = False

    def reconnect(self, reason: str) -> None:
        self.reconnects.append(reason)

    def call_in_flight(self) -> bool:
        return self.in_flight

    def route_chosen(self) -> None:
        pass  # the first choice is not a reconnect


def _write_status(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


async def _main(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if cfg.uplink is None:
        print(f"{cfg.path}: no [uplink] section", file=sys.stderr)
        return 2
    url = urlsplit(cfg.csms["url"])
    host = url.hostname or ""
    port = url.port or 443
    tls = ssl.create_default_context(cafile=cfg.csms["ca_file"] or None)
    session = RecordingSession()
    status = Path(args.status_file) if args.status_file else None
    sup: UplinkSupervisor

    def changed() -> None:
        if status is not None:
            _write_status(status, {**sup.snapshot(), "reconnects": session.reconnects})

    sup = UplinkSupervisor(
        cfg.uplink,
        host,
        port,
        session=session,
        tls=tls,
        link_poll_s=args.link_poll_s,
        modem_poll_s=args.modem_poll_s,
        on_change=changed,
    )
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(sup.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.cancel)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := (await reader.readline()).decode().strip():
            verb, _, arg = line.partition(" ")
            try:
                if verb == "switch":
                    await sup.switch(arg)
                elif verb == "auto":
                    await sup.release()
                elif verb == "call":
                    session.in_flight = arg == "on"
                elif verb == "identity":
                    logging.info("identity: %s", await sup.identity())
                else:
                    logging.error("unknown command %r", line)
            except ValueError as exc:
                logging.error("uplink switch: %s", exc)
            changed()

    commander = asyncio.create_task(commands())
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    commander.cancel()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.uplink")
    parser.add_argument("--config", required=True)
    parser.add_argument("--status-file")
    parser.add_argument("--link-poll-s", type=float, default=0.5)
    parser.add_argument("--modem-poll-s", type=float, default=60.0)
    parser.add_argument("--child", action="store_true", help="run for the agent (JSON lines)")
    args = parser.parse_args()
    if args.child:
        return _child(args.config)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


def _child(path: str) -> int:
    from agent import logs
    from agent.uplink.child import serve

    try:
        cfg = load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logs.setup(cfg.agent["log_level"], cfg.agent["log_target"])
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per message
    logs.add_secret(cfg.csms["password"])
    if cfg.uplink is None:
        logging.getLogger("evcp.uplink").error("%s: no [uplink] section", cfg.path)
        return 2
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
