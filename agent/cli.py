"""The ``evcp`` command: run the agent, inspect it, drive the simulator, run the demo.

Exit status: 0 success, 1 a runtime failure (agent not running, device not answering),
2 a usage or configuration error. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from agent import __version__, deferred
from agent.config import Config, ConfigError, check_meter_map, check_placeholders, load
from agent.control import ControlError, request

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
    p.add_argument("--verbose", action="store_true", help="show the agent's log")
    p = sub.add_parser("schedule", help="the composite charging schedule for the next 24 h")
    with_config(p)
    p.add_argument("--connector", type=int, default=1, help="connector id (0: the charger)")
    p.add_argument("--unit", choices=("A", "W"), default="A",
                   help="limits in amperes (default) or watts")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("firmware", help="firmware update state (works without the agent)")
    p.add_argument("action", choices=("status",))
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
    p.add_argument("--tx", metavar="ID", help="only lines about this transaction id")
    p.add_argument("--since", metavar="WHEN",
                   help='from this time on, as journalctl takes it ("1h ago", "today", ...)')  # fmt: skip
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true", help="one JSON object per line (journal fields)")
    p.add_argument("--unit", default="evcp.service", help="systemd unit (default: %(default)s)")
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


def _main(argv: list[str] | None = None) -> int:
    deferred.defer_unused()  # before argparse and websockets import them: less memory
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
    from agent import app, logs
    from agent.hardware import HardwareError
    from agent.store import StoreInUse

    cfg = load(args.config)
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
    csms = answer["csms"]
    state = "connected" if csms["connected"] else "not connected"
    if csms["connected"] and not csms["registered"]:
        state += " (not yet accepted)"
    print(f"evcp {answer['version']} (pid {answer['pid']})")
    print(f"CSMS     {csms['url']} as {csms['charge_point_id']}: {state}")
    if csms.get("last_error"):
        print(f"         last error: {csms['last_error']}")
    queue = answer["queue"]
    dropped = queue.get("dropped", 0)
    print(
        f"Queue    {queue['pending']} pending, {queue['failed']} failed"
        + (f", {dropped} MeterValues thinned" if dropped else "")
    )
    storage = answer.get("storage")
    if isinstance(storage, dict) and storage.get("on_disk") is False:
        print("Storage  WARNING: the state file cannot be written; keeping state in memory")
    if isinstance(storage, dict) and storage.get("stage"):
        print(f"Storage  MeterValues staged in RAM ({storage['stage']}) until written to disk")
    from agent.uplink.control import status_lines

    for line in status_lines(answer.get("uplink")):
        print(line)
    print()
    header = f"{'#':>2}  {'status':<14} {'vehicle':<11} {'offered':>8} {'power':>9} "
    header += f"{'energy':>11}  transaction"
    print(header)
    for c in answer["connectors"]:
        status = c["status"] + ("" if c["error_code"] == "NoError" else f" ({c['error_code']})")
        tx = "-" if c["transaction_id"] is None else str(c["transaction_id"])
        print(
            f"{c['id']:>2}  {status:<14} {c['vehicle']:<11} {c['offered_current_a']:>6.1f} A"
            f" {c['power_w']:>7.0f} W {c['energy_wh']:>8.0f} Wh  {tx}"
        )
    return 0


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

    return run_demo(time_scale=args.time_scale, keep=args.keep, verbose=args.verbose)


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


def journalctl_command(args: argparse.Namespace) -> list[str]:
    """The journalctl invocation for ``evcp logs``."""
    cmd = ["journalctl", "--unit", args.unit, "--no-pager"]
    if args.since:
        cmd += ["--since", args.since]
    if args.follow:
        cmd.append("--follow")
    cmd += ["--output", "json" if args.json else "short-iso"]
    if args.tx:
        if not args.tx.isdigit():
            raise UsageError(f"--tx {args.tx!r}: a transaction id is a whole number")
        # The agent names a transaction "transaction N" (the CSMS's id) or "local N".
        cmd += ["--grep", rf"(transaction|tx|local)[ #=]*{args.tx}\b", "--case-sensitive=false"]
    return cmd


def cmd_logs(args: argparse.Namespace) -> int:
    cmd = journalctl_command(args)
    if shutil.which("journalctl") is None:
        raise ControlError(
            "journalctl is not installed here (systemd's journal): the agent's log is"
            ' wherever its stderr goes (run it with log_target = "stderr")'
        )
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
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
