"""The ``evcp`` command: run the agent, inspect it, drive the simulator, run the demo.

Exit status: 0 success, 1 a runtime failure (agent not running, device not answering),
2 a usage or configuration error. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from agent import __version__, deferred
from agent.config import Config, ConfigError, check_meter_map, check_placeholders, load
from agent.control import ControlError, request

if TYPE_CHECKING:
    import argparse  # imported by _parser(): `evcp run` never needs it

DEFAULT_CONFIG = "/etc/evcp/evcp.toml"

SIM_COMMANDS = {
    # name: (arguments, help)
    "plug": (["connector"], "plug the virtual EV into a connector"),
    "unplug": (["connector"], "unplug the virtual EV"),
    "swipe": (["tag", "connector?"], "present an RFID tag (idTag)"),
    "fault": (["connector", "code"], "inject a controller fault, e.g. GroundFailure"),
    "clear-fault": (["connector"], "clear the injected fault"),
    "ev-pause": (["connector"], "the EV stops asking for power (SuspendedEV)"),
    "ev-resume": (["connector"], "the EV asks for power again"),
    "ev-max-current": (["connector", "current_a"], "the most current the EV accepts"),
    "meter-silent": (["connector"], "the meter stops answering"),
    "meter-ok": (["connector"], "the meter answers again"),
    "controller-reset": (["connector"], "the EVSE controller reboots ($AB)"),
    "rapi-garbage": (["connector"], "line noise on the controller's serial line"),
    "meter-exception": (["connector", "code"], "the meter answers a Modbus exception code"),
    "meter-exception-clear": (["connector"], "the meter answers normally again"),
    "state": ([], "print the simulator's state"),
}


EXIT_STATUS = """exit status:
  0    success
  1    a runtime failure: the agent is not running, a device does not answer, a
       selftest check failed, the state file is in use by another agent
  2    a usage or configuration error (the message names the file and key)
  130  interrupted (Ctrl-C)"""


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="evcp",
        description="OCPP 1.6J charge-point agent for Linux EV chargers.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"evcp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("epilog", EXIT_STATUS)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return subparsers(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", default=DEFAULT_CONFIG, help="config file (TOML; default: %(default)s)"
        )

    p = sub.add_parser("run", help="run the agent in the foreground")
    with_config(p)
    p = sub.add_parser("status", help="show the running agent's state")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("check-config", help="validate a config file and exit")
    with_config(p)
    p = sub.add_parser(
        "sim",
        help="drive the simulated hardware of a running agent",
        description="Commands: "
        + "; ".join(f"{name} {' '.join(a)}: {h}" for name, (a, h) in SIM_COMMANDS.items()),
    )
    with_config(p)
    p.add_argument("action", choices=sorted(SIM_COMMANDS), help="what to simulate (see above)")
    p.add_argument("args", nargs="*", help="the action's arguments (see above)")
    p.add_argument("--json", action="store_true", help="print the simulator's answer as JSON")
    p = sub.add_parser(
        "queue",
        help="transaction messages given up on; 'retry' sends them again",
        description="List the transaction messages the agent gave up on (the CSMS refused"
        " them TransactionMessageAttempts times); 'retry' puts them back in the queue, in"
        " their place, and sends them again.",
    )
    with_config(p)
    p.add_argument("action", nargs="?", choices=("list", "retry"), default="list",
                   help="list the failed messages (default) or send them again")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("demo", help="run a whole charging session against a local CSMS")
    p.add_argument("--time-scale", type=float, default=60.0,
                   help="simulated seconds per real second for the meter (default 60)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    p.add_argument("--serve", action="store_true",
                   help="play nothing: keep the CSMS and the agent up (drive them with evcp"
                   " sim and evcp status --config PRINTED-PATH) until Ctrl-C")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="show the agent's log")
    p = sub.add_parser("schedule", help="the composite charging schedule for the next 24 h")
    with_config(p)
    p.add_argument("--connector", type=int, default=1, help="connector id (0: the charger)")
    p.add_argument("--unit", choices=("A", "W"), default="A",
                   help="limits in amperes (default) or watts")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("firmware", help="firmware update state (works without the agent)")
    p.add_argument(
        "action", choices=("status",), help="status: version, pending update, last result"
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("probe", help="talk to one configured device once (bring-up)")
    p.add_argument("device", choices=("meter", "evse"), help="the meter or the EVSE controller")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "logs",
        help="the service's journal (journalctl -u evcp), filtered",
        description="Show the evcp service's log from the journal (root or the"
        " systemd-journal/adm group can read it).",
    )
    p.add_argument("--tx", metavar="ID",
                   help="only lines about this transaction: the CSMS's transactionId, or"
                   " local:N for the agent's own id (evcp tx shows both); matched on the"
                   " journal fields EVCP_CSMS_TRANSACTION / EVCP_TRANSACTION")  # fmt: skip
    p.add_argument("--since", metavar="WHEN",
                   help='from this time on, as journalctl takes it ("1h ago", "today", ...)')  # fmt: skip
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true", help="one JSON object per line (journal fields)")
    p.add_argument("--unit", default="evcp.service",
                   help='systemd unit (default: %(default)s); "" for the lines evcp logged'
                   " itself, whatever started it (SYSLOG_IDENTIFIER=evcp)")  # fmt: skip
    p = sub.add_parser(
        "config",
        help="the OCPP configuration keys of the running agent: get, or set (root)",
        description="Read the OCPP configuration keys through the running agent, as"
        " GetConfiguration answers them (AuthorizationKey is write-only), or change one with"
        " the same validation as ChangeConfiguration (root only).",
    )
    config_sub = p.add_subparsers(dest="config_action", metavar="ACTION", required=True,
                                  help="get or set")  # fmt: skip
    q = config_sub.add_parser(
        "get",
        help="print keys (all when none is named)",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    with_config(q)
    q.add_argument("keys", nargs="*", metavar="KEY", help="key names (default: every key)")
    q.add_argument("--json", action="store_true", help='print {"KEY": "value", ...}')
    q = config_sub.add_parser(
        "set",
        help="change one key (root only)",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    with_config(q)
    q.add_argument("key", metavar="KEY", help="key name, e.g. HeartbeatInterval")
    q.add_argument("value", metavar="VALUE", help="the new value, as ChangeConfiguration takes it")
    q.add_argument("--json", action="store_true", help='print {"key", "status"}')
    p = sub.add_parser(
        "tx",
        help="recent transactions: energy, reason, whether the CSMS has them",
        description="The most recent transactions, newest first, with their energy, stop"
        " reason and whether the CSMS acknowledged every message of them (delivered).",
    )
    with_config(p)
    p.add_argument("--last", type=int, default=10, metavar="N",
                   help="how many (1 to 10000; default: %(default)s)")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help='print a list of {"transaction_id", "local_id", "connector_id",'
                   ' "id_tag", "meter_start_wh", "meter_stop_wh", "energy_wh", "started",'
                   ' "stopped", "reason", "running", "delivered"}')  # fmt: skip
    p = sub.add_parser(
        "uplink",
        help="force an uplink for field testing (root only); 'auto' gives the choice back",
        description="evcp uplink switch NAME makes link NAME (an [[uplink.links]] name) the"
        " one in use, if it is healthy, until 'evcp uplink switch auto'. Root only.",
    )
    with_config(p)
    p.add_argument("action", choices=("switch",), help="switch: force LINK (or auto)")
    p.add_argument("link", help="a link name from [[uplink.links]], or auto")
    p.add_argument("--json", action="store_true", help="print the uplink state as JSON")
    p = sub.add_parser(
        "selftest",
        help="the commissioning checklist: clock, DNS, TLS, Basic Auth, meter, controller,"
        " disk, state database",
        description="Run every check and print a pass/fail table; exit 0 only when every"
        " required check passed.",
    )
    with_config(p)
    p.add_argument("--offline", action="store_true",
                   help="skip the network checks (dns, csms-tls, csms-auth): not required")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help='print {"passed": bool, "checks": [{"name", "passed", "required",'
                   ' "detail"}]}')  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Output to a pipe closed early (``evcp status | head -1``) ends the
    command quietly with status 0: the reader had what it wanted."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush at exit: stdout goes nowhere from now on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return code


def run_config(argv: list[str]) -> str | None:
    """The config file when ``argv`` is exactly ``run``, ``run --config PATH`` or
    ``run --config=PATH`` (how the unit starts the agent), else None. The daemon's
    command line is read without argparse, which the agent then never imports (about
    0.2 MiB of resident memory); anything else (``--help``, a typo) goes to argparse,
    which answers it as always."""
    if not argv or argv[0] != "run":
        return None
    rest = argv[1:]
    if not rest:
        return DEFAULT_CONFIG
    if len(rest) == 2 and rest[0] == "--config" and rest[1] and not rest[1].startswith("-"):
        return rest[1]
    if len(rest) == 1 and rest[0].startswith("--config=") and len(rest[0]) > len("--config="):
        return rest[0].partition("=")[2]
    return None


def _main(argv: list[str] | None = None) -> int:
    deferred.defer_unused()  # before argparse and websockets import them: less memory
    config = run_config(sys.argv[1:] if argv is None else argv)
    if config is not None:
        try:
            return run(config)
        except ConfigError as exc:
            print(f"evcp: config error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        handler = {
            "run": cmd_run,
            "status": cmd_status,
            "check-config": cmd_check_config,
            "sim": cmd_sim,
            "queue": cmd_queue,
            "demo": cmd_demo,
            "probe": cmd_probe,
            "schedule": cmd_schedule,
            "firmware": cmd_firmware,
            "logs": cmd_logs,
            "selftest": cmd_selftest,
            "config": cmd_config,
            "tx": cmd_tx,
            "uplink": cmd_uplink,
        }[args.command]
        return handler(args)
    except ConfigError as exc:
        print(f"evcp: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"evcp: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"evcp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    check_meter_map(cfg)
    check_placeholders(cfg)
    print(f"{cfg.path}: OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return run(args.config)


def run(config: str) -> int:
    """``evcp run``: the agent, in the foreground, until it is stopped."""
    from agent import app, logs
    from agent.hardware import HardwareError
    from agent.store import StoreInUse

    cfg = load(config)
    check_meter_map(cfg)
    check_placeholders(cfg)
    # The state (and the AuthorizationKey in it) is the agent's: 0750 directories, 0640
    # files, whatever umask the agent was started with (the unit sets UMask=0027 too).
    os.umask(os.umask(0o027) | 0o027)
    logs.setup(cfg.agent["log_level"], cfg.agent["log_target"])
    log = logging.getLogger("evcp")
    while True:
        try:
            kind = asyncio.run(app.run(cfg))
        except HardwareError as exc:
            print(f"evcp: hardware: {exc}", file=sys.stderr)
            return 1
        except StoreInUse as exc:
            print(f"evcp: {exc}", file=sys.stderr)
            return 1
        if kind is None:
            return 0
        command = cfg.agent["reboot_command"]
        if kind == "Hard" and command:
            log.warning("hard reset: running %s", command)
            done = subprocess.run(command, shell=True, check=False)
            if done.returncode == 0:
                return 0
            log.error("hard reset: %s failed (exit status %d): restarting the agent instead"
                      " (see reboot_command in etc/evcp.toml)", command,
                      done.returncode)  # fmt: skip
        log.warning("%s reset: restarting the agent", kind)


def _control(cfg: Config, payload: dict[str, Any]) -> dict[str, Any]:
    answer = request(cfg.control_socket, payload)
    if not answer.pop("ok", False):
        raise ControlError(str(answer.get("error", "the agent refused the request")))
    return answer


def _printed_json(answer: dict[str, Any], args: argparse.Namespace) -> bool:
    """With ``--json``, print the agent's answer as JSON and say so."""
    if args.json:
        print(json.dumps(answer, indent=2))
    return bool(args.json)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    answer = _control(cfg, {"cmd": "status"})
    if _printed_json(answer, args):
        return 0
    print("\n".join(status_table(answer)))
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _seconds_between(earlier: str, later: str) -> float | None:
    from datetime import datetime

    try:
        a = datetime.fromisoformat(earlier.replace("Z", "+00:00"))
        b = datetime.fromisoformat(later.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return (b - a).total_seconds()


def _stage_line(storage: dict[str, Any]) -> str | None:
    stage = storage.get("stage")
    if not stage:
        return None
    fs = storage.get("stage_filesystem")
    if fs in ("tmpfs", "ramfs"):
        return f"Storage  MeterValues staged in RAM ({stage}) until written to disk"
    where = f" on {fs}" if fs else ""
    return (f"Storage  MeterValues staged in {stage}{where}, not in RAM (stage_dir on a tmpfs"
            " such as /run/evcp saves the disk writes)")  # fmt: skip


def status_table(answer: dict[str, Any]) -> list[str]:
    """``evcp status`` without ``--json``: what the snapshot says, for a person."""
    out: list[str] = []
    phase = answer.get("phase", "running")
    head = f"evcp {answer['version']} (pid {answer['pid']})"
    if phase != "running":
        head += f": {phase}"
    if answer.get("uptime_s") is not None:
        head += f", up {_ago(float(answer['uptime_s']))}"
    out.append(head)
    csms = answer["csms"]
    state = "connected" if csms["connected"] else "not connected"
    if csms["connected"] and not csms["registered"]:
        state += " (not yet accepted)"
    registration = csms.get("registration")
    if registration and registration != "Accepted":
        state += f" (BootNotification: {registration})"
    out.append(f"CSMS     {csms['url']} as {csms['charge_point_id']}: {state}")
    clock = answer.get("clock") or {}
    heartbeat = csms.get("last_heartbeat")
    if heartbeat:
        ago = _seconds_between(heartbeat, clock.get("now", ""))
        out.append(f"         last heartbeat {heartbeat}"
                   + ("" if ago is None else f" ({_ago(ago)} ago)"))  # fmt: skip
    elif csms["connected"]:
        out.append("         no heartbeat yet")
    if csms.get("last_error"):
        out.append(f"         last error: {csms['last_error']}")
    if "synchronized" in clock:
        servers = ", ".join(clock.get("ntp_servers") or [])
        if not servers:
            line = "system clock trusted (NTP off: [time] ntp_servers is empty)"
        elif clock["synchronized"]:
            age = clock.get("last_sync_age_s")
            since = "" if age is None else f", last sync {_ago(float(age))} ago"
            line = f"synchronised (offset {float(clock.get('offset_s') or 0):+.3f} s{since})"
        else:
            line = "NOT synchronised: timestamps may be wrong"
        if servers:
            line += f"; NTP: {servers}"
        now = str(clock.get("now", ""))
        out.append(f"Clock    {now} {line}" if now else f"Clock    {line}")
    queue = answer["queue"]
    dropped = queue.get("dropped", 0)
    out.append(
        f"Queue    {queue['pending']} pending, {queue['failed']} failed"
        + (f", {dropped} MeterValues thinned" if dropped else "")
    )
    storage = answer.get("storage")
    if isinstance(storage, dict) and storage.get("on_disk") is False:
        out.append("Storage  WARNING: the state file cannot be written; keeping state in memory")
    stage_line = _stage_line(storage) if isinstance(storage, dict) else None
    if stage_line:
        out.append(stage_line)
    from agent.uplink.control import status_lines

    out.extend(status_lines(answer.get("uplink")))
    connectors = answer.get("connectors") or []
    if not connectors:
        if phase != "running":
            out.append("")
            out.append(f"Connectors: not yet known ({phase})")
        return out
    rows = []
    for c in connectors:
        status = c["status"] + ("" if c["error_code"] == "NoError" else f" ({c['error_code']})")
        tx = "-"
        if c.get("transaction_id") is not None:
            tx = str(c["transaction_id"])
            if c.get("transaction_local_id") is not None:
                tx += f" (local {c['transaction_local_id']})"
        elif c.get("transaction_local_id") is not None:
            tx = f"local {c['transaction_local_id']} (no CSMS id yet)"
        session = c.get("session_energy_wh")
        rows.append((c, status, tx, "-" if session is None else f"{session / 1000:.3f} kWh"))
    width = max(6, *(len(r[1]) for r in rows))
    out.append("")
    out.append(f"{'#':>2}  {'status':<{width}}  {'vehicle':<11} {'offered':>8} {'power':>9}"
               f" {'session':>11} {'meter':>12}  transaction")  # fmt: skip
    for c, status, tx, session in rows:
        out.append(
            f"{c['id']:>2}  {status:<{width}}  {c['vehicle']:<11} {c['offered_current_a']:>6.1f} A"
            f" {c['power_w']:>7.0f} W {session:>11} {c['energy_wh'] / 1000:>8.3f} kWh  {tx}"
        )
        if c.get("fault"):
            out.append(f"{'':>2}  why: {c['fault']}")
    return out


def cmd_queue(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.action == "retry":
        answer = _control(cfg, {"cmd": "queue-retry"})
        if args.json:
            print(json.dumps({"requeued": answer["requeued"]}))
        else:
            print(f"{answer['requeued']} failed message(s) put back in the queue")
        return 0
    answer = _control(cfg, {"cmd": "queue"})
    if _printed_json(answer, args):
        return 0
    failed = answer["failed"]
    print(f"{answer['pending']} pending, {len(failed)} failed")
    if failed:
        print()
        print(f"{'#':>6}  {'message':<16} {'transaction':<13} {'taken at':<20}  last error")
        for m in failed:
            tx = m["transaction_id"] if m["transaction_id"] is not None else "-"
            if m["transaction_id"] is None and m["local_transaction"] is not None:
                tx = f"local {m['local_transaction']}"
            print(f"{m['seq']:>6}  {m['action']:<16} {tx!s:<13} {m['taken_at']:<20}"
                  f"  {m['last_error'] or ''}")  # fmt: skip
        print()
        print("evcp queue retry: send them again")
    return 0


def _int_arg(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {value!r}") from None


def cmd_sim(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    names, _help = SIM_COMMANDS[args.action]
    required = [n for n in names if not n.endswith("?")]
    if not len(required) <= len(args.args) <= len(names):
        usage = " ".join(f"[{n[:-1]}]" if n.endswith("?") else n.upper() for n in names)
        raise UsageError(f"usage: evcp sim {args.action} {usage}")
    values = dict(zip([n.rstrip("?") for n in names], args.args, strict=False))
    if "connector" in values:
        _check_connector(cfg, _int_arg(values["connector"], "connector"), zero=False)
    if args.action == "fault":
        _check_fault(values["code"])
    if args.action == "swipe":
        payload: dict[str, Any] = {"cmd": "swipe", "tag": values["tag"]}
        if "connector" in values:
            payload["connector"] = _int_arg(values["connector"], "connector")
        answer = _control(cfg, payload)
        print(answer["result"])
        return 0
    forwarded: dict[str, Any] = {"cmd": args.action}
    if "connector" in values:
        forwarded["connector"] = _int_arg(values["connector"], "connector")
    if "code" in values:
        forwarded["code"] = (
            _int_arg(values["code"], "code") if args.action == "meter-exception" else values["code"]
        )
    if "current_a" in values:
        try:
            forwarded["current_a"] = float(values["current_a"])
        except ValueError:
            raise UsageError("current_a must be a number") from None
    answer = _control(cfg, {"cmd": "sim", "request": forwarded})
    if args.action == "state" or args.json:
        print(json.dumps(answer, indent=2))
    else:
        print("ok")
    return 0


def _check_connector(cfg: Config, connector: int, *, zero: bool) -> None:
    count = int(cfg.hardware["connectors"])
    if not (0 if zero else 1) <= connector <= count:
        allowed = f"{0 if zero else 1} to {count}" if count > 1 or zero else "1"
        raise UsageError(
            f"connector {connector}: {cfg.path} has {count} connector(s): use {allowed}"
        )


def _check_fault(code: str) -> None:
    from agent.app import SIM_FAULTS
    from drivers.base import FaultCode

    accepted = [*SIM_FAULTS, *(f.value for f in FaultCode)]
    if code not in accepted:
        raise UsageError(f"unknown fault {code!r}: use one of {', '.join(accepted)}")


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.ocpp.demo import run_demo

    return run_demo(
        time_scale=args.time_scale, keep=args.keep, verbose=args.verbose, serve=args.serve
    )


def cmd_schedule(args: argparse.Namespace) -> int:
    from agent import schedule_view

    cfg = load(args.config)
    _check_connector(cfg, args.connector, zero=True)
    answer = _control(
        cfg, {"cmd": "schedule", "connector": args.connector, "unit": args.unit, "hours": 24}
    )
    view = schedule_view.as_json(int(answer["connector_id"]), answer["schedule"])
    if args.json:
        print(json.dumps(view))
        return 0
    print(schedule_view.table(view))
    print()
    print(schedule_view.plot(view))
    return 0


def cmd_firmware(args: argparse.Namespace) -> int:
    from agent.features.firmware.service import status_view

    cfg = load(args.config)
    view = status_view(cfg.firmware_dir, __version__)
    if args.json:
        print(json.dumps(view))
        return 0
    print(f"evcp {view['version']}: firmware {view['status']}")
    pending = view["pending"]
    if pending:
        print(f"Pending  {pending['state']}: {pending['location']}"
              f" (attempt {pending['attempt']} of {pending['attempts']})")  # fmt: skip
        if pending.get("last_error"):
            print(f"         last error: {pending['last_error']}")
    else:
        print("Pending  nothing")
    print(f"Last     {view['last_result'] or '-'}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from agent.probe import probe

    cfg = load(args.config)
    check_meter_map(cfg)
    return int(probe(cfg, args.device, as_json=args.json))


def parse_tx(value: str) -> tuple[str, int]:
    """``evcp logs --tx``: ``N`` (the CSMS's transactionId) or ``local:N`` (the agent's)."""
    kind, _, number = value.rpartition(":")
    if kind not in ("", "local") or not number.isdigit():
        raise UsageError(
            f"--tx {value!r}: give the CSMS's transaction id (a whole number) or local:N"
        )
    return ("local" if kind else "csms"), int(number)


def journalctl_command(args: argparse.Namespace, local_id: int | None = None) -> list[str]:
    """The journalctl invocation for ``evcp logs``; with ``--tx``, the lines whose journal
    fields name the transaction: ``local_id`` (every line about a transaction carries
    EVCP_TRANSACTION, its local id, also those logged before the CSMS gave its id), else
    the CSMS's id (EVCP_CSMS_TRANSACTION)."""
    cmd = ["journalctl", *_journal_source(args), "--no-pager"]
    if args.since:
        cmd += ["--since", args.since]
    if args.follow:
        cmd.append("--follow")
    cmd += ["--output", "json" if args.json else "short-iso"]
    if args.tx:
        kind, number = parse_tx(args.tx)
        if kind == "local" or local_id is not None:
            cmd.append(f"EVCP_TRANSACTION={number if kind == 'local' else local_id}")
        else:
            cmd.append(f"EVCP_CSMS_TRANSACTION={number}")
    return cmd


def _journal_source(args: argparse.Namespace) -> list[str]:
    return ["--unit", args.unit] if args.unit else ["--identifier", "evcp"]


def local_id_of(args: argparse.Namespace, csms_id: int) -> int | None:
    """The local id of the CSMS's transaction ``csms_id``, from the newest journal line
    that names both (None when no line does)."""
    cmd = ["journalctl", *_journal_source(args), "--no-pager", "--output", "json",
           "--reverse", "--lines", "1", f"EVCP_CSMS_TRANSACTION={csms_id}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        try:
            value = json.loads(line).get("EVCP_TRANSACTION")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def cmd_logs(args: argparse.Namespace) -> int:
    cmd = journalctl_command(args)  # (checks --tx first: a usage error needs no journal)
    import shutil  # (here: shutil imports bz2 and lzma, see agent.deferred)

    if shutil.which("journalctl") is None:
        raise ControlError(
            "journalctl is not installed here (systemd's journal): the agent's log is"
            ' wherever its stderr goes (run it with log_target = "stderr")'
        )
    if args.tx:
        kind, number = parse_tx(args.tx)
        if kind == "csms":
            local_id = local_id_of(args, number)
            if local_id is None:
                print(f"evcp: no journal line names the CSMS's transaction {number} (yet);"
                      " showing the lines that will", file=sys.stderr)  # fmt: skip
            cmd = journalctl_command(args, local_id)
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.config_action == "set":
        return _config_set(cfg, args)
    answer = request(cfg.control_socket, {"cmd": "config-get", "keys": args.keys or None})
    if answer.get("unknown"):
        # A key name the agent does not know is a usage error; the rest are not printed.
        names = ", ".join(str(n) for n in answer["unknown"])
        raise UsageError(f"unknown configuration key(s): {names} (evcp config get: every key)")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "the agent refused the request")))
    values: dict[str, Any] = answer["keys"]
    if args.json:
        print(json.dumps(values, indent=2))
        return 0
    readonly = set(answer.get("readonly", []))
    width = max((len(k) for k in values), default=3)
    for key, value in values.items():
        shown = "(not set)" if value is None else str(value)
        print(f"{key:<{width}}  {shown}" + ("  (read-only)" if key in readonly else ""))
    return 0


def _config_set(cfg: Config, args: argparse.Namespace) -> int:
    answer = request(cfg.control_socket, {"cmd": "config-set", "key": args.key,
                                          "value": args.value})  # fmt: skip
    status = answer.get("status")
    if not answer.get("ok"):
        error = str(answer.get("error", "the agent refused the request"))
        if status in ("Rejected", "NotSupported"):
            # The value (or key) is wrong: a usage error, nothing was changed.
            raise UsageError(f"config set refused: {error}")
        raise ControlError(error)
    if args.json:
        print(json.dumps({"key": args.key, "status": status}))
    elif status == "RebootRequired":
        print(f"{args.key} set: takes effect when the agent restarts (RebootRequired)")
    else:
        print(f"{args.key} set ({status})")
    return 0


def cmd_tx(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if not 1 <= args.last <= 10_000:
        raise UsageError(f"--last {args.last}: use a number from 1 to 10000")
    answer = _control(cfg, {"cmd": "tx", "last": args.last})
    rows: list[dict[str, Any]] = answer["transactions"]
    for row in rows:
        start, stop = row.get("meter_start_wh"), row.get("meter_stop_wh")
        row["energy_wh"] = stop - start if start is not None and stop is not None else None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no transactions yet")
        return 0
    print(f"{'transaction':>11} {'local':>6} {'#':>2}  {'idTag':<20} {'started':<20}"
          f" {'energy':>10}  {'reason':<14} CSMS has it")  # fmt: skip
    for row in rows:
        csms_id = "-" if row["transaction_id"] is None else str(row["transaction_id"])
        energy = "-" if row["energy_wh"] is None else f"{row['energy_wh'] / 1000:.3f} kWh"
        reason = "(running)" if row.get("running") else str(row["reason"] or "-")
        delivered = "yes" if row["delivered"] else "no" if not row.get("running") else "-"
        print(f"{csms_id:>11} {row.get('local_id', '-')!s:>6} {row['connector_id']:>2}"
              f"  {row['id_tag']:<20} {row.get('started') or '-':<20} {energy:>10}"
              f"  {reason:<14} {delivered}")  # fmt: skip
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from agent import selftest

    cfg = load(args.config)
    check_meter_map(cfg)
    try:
        status: dict[str, Any] | None = _control(cfg, {"cmd": "status"})
    except ControlError:
        status = None
    result = selftest.run(cfg, offline=args.offline, status=status)
    print(json.dumps(result, indent=2) if args.json else selftest.table(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())


def cmd_uplink(args: argparse.Namespace) -> int:
    """``evcp uplink switch NAME|auto``."""
    from agent.uplink.control import status_lines

    cfg = load(args.config)
    answer = _control(cfg, {"cmd": "uplink-switch", "link": args.link})
    if _printed_json(answer["uplink"], args):
        return 0
    for line in status_lines(answer["uplink"]):
        print(line)
    return 0
