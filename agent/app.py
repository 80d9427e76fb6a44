"""The composition root of ``evcp run``: config -> clock -> drivers -> station -> session.

Everything long-running lives in one TaskGroup. systemd is told READY=1 once the hardware
is up (the CSMS may be unreachable for days; the charger still works), and the watchdog is
fed from the event loop, so a stuck loop gets the service restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from agent import __version__
from agent.aio import raise_if_cancelling
from agent.assembly import ChargePoint, assemble
from agent.chargepoint.station import Station
from agent.config import Config
from agent.control import Peer
from agent.control import serve as serve_control
from agent.core.config_keys import ConfigKeys
from agent.core.security import EventType
from agent.features.firmware.keys import supported_protocols
from agent.features.firmware.port import FirmwarePort
from agent.features.registry import ConfigKeys as KeyRegistry
from agent.features.registry import is_secret
from agent.hardware import SimProcess, build
from agent.logs import add_secret, set_authorization_key
from agent.ocpp.session import Session
from agent.status import failed_messages, retry_failed_messages, snapshot, starting_snapshot
from agent.store import Store
from agent.uplink.control import handle_switch
from drivers.base import FaultCode
from drivers.clock.ntp import ClockGuard

if TYPE_CHECKING:
    from agent.uplink.client import UplinkClient

log = logging.getLogger("evcp")

#: `evcp sim fault 1 GroundFailure`: OCPP error code names the simulator understands.
SIM_FAULTS: dict[str, FaultCode] = {
    "GroundFailure": FaultCode.GROUND_FAULT,
    "HighTemperature": FaultCode.OVER_TEMPERATURE,
    "OverCurrentFailure": FaultCode.OVER_CURRENT,
    "PowerSwitchFailure": FaultCode.STUCK_RELAY,
    "EVCommunicationError": FaultCode.PILOT,
    "OtherError": FaultCode.VENT_REQUIRED,
}


def sd_notify(message: str) -> None:
    """Tell systemd (if it is watching) about our state."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        from systemd import daemon
    except ImportError:
        pass
    else:
        # Best effort, as sd_notify(3) is: a socket that went away must not stop charging.
        with contextlib.suppress(OSError):
            daemon.notify(message)
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


class _Stop(Exception):
    """Raised to leave the TaskGroup on SIGTERM/SIGINT."""


#: Runs of the agent in this process whose start-up objects are frozen
#: (:func:`_startup_frozen`).
_FROZEN_RUNS = [0]


@contextlib.asynccontextmanager
async def _startup_frozen() -> AsyncIterator[None]:
    """Keep what the agent built to start out of the garbage collector's full collections
    (``gc.freeze``) while it runs. A full collection looks at every object it tracks, and
    comes when a burst of allocation (a SendLocalList of 10,000 entries parsed) follows
    others: with the start-up's objects in sight it held the event loop 30-45 ms on a PC,
    far more on a charger's CPU. What is frozen is never collected: a collection first, and
    everything is given back (``gc.unfreeze``) when the last run in this process ends
    (the tests run many)."""
    gc.collect()
    gc.freeze()
    _FROZEN_RUNS[0] += 1
    try:
        yield
    finally:
        _FROZEN_RUNS[0] -= 1
        if not _FROZEN_RUNS[0]:
            gc.unfreeze()


class Restart(Exception):
    """Raised to leave the TaskGroup when the CSMS asked for a Reset."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def run(cfg: Config) -> str | None:
    """Run the agent until SIGTERM/SIGINT (returns None) or a Reset (returns its kind)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # from the start: NTP may take a while
    try:
        return await _run(cfg, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _unless_stopped(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Await ``work``; False (and ``work`` cancelled) when a stop signal comes first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # cancelled ourselves: the work (it may step the clock) ends too
        raise
    finally:
        stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise_if_cancelling()
    log.info("stopping on signal (while starting)")
    return False


async def _run(cfg: Config, stop: asyncio.Event) -> str | None:
    store = Store.open(cfg.state_dir)
    store.max_queue = int(cfg.agent["queue_max_messages"])
    stage = Path(cfg.agent["stage_dir"]) / "stage.db"
    try:
        left = stage.exists()
    except OSError:  # (a directory this user may not enter: not this agent's stage)
        left = False
    if cfg.agent["queue_flush_s"] or left:  # (0: only move what a run left there)
        store.stage(stage, float(cfg.agent["queue_flush_s"]))
    password = store.get("csms.password") or cfg.csms["password"]
    set_authorization_key(password)  # the key in use: it and the one before it stay redacted
    add_secret(cfg.csms["password"])
    proxy_password = urlsplit(cfg.csms["proxy"]).password if cfg.csms["proxy"] else None
    if proxy_password:  # an error about the proxy may quote its URL
        add_secret(proxy_password)
        add_secret(unquote(proxy_password))
    try:
        keys = KeyRegistry(
            stored=store.config_values(),
            overrides=dict(cfg.ocpp),
            fixed={
                "NumberOfConnectors": str(len(cfg.connector_ids)),
                "SupportedFileTransferProtocols": supported_protocols(
                    bool(cfg.firmware["allow_http"])
                ),
            },
        )
    except ValueError as exc:
        from agent.config import ConfigError

        raise ConfigError(f"{cfg.path}: {exc}") from None

    clock = ClockGuard(
        timeout_s=float(cfg.time["timeout_s"]),
        step_system_clock=bool(cfg.time["step_system_clock"]),
    )
    live = Live(cfg=cfg, store=store, keys=keys, clock=clock)
    clock.on_step = lambda offset_s: live.security_event(
        EventType.SETTING_SYSTEM_TIME, f"NTP stepped the system clock by {offset_s:+.3f} s"
    )
    store.on_disk_full = lambda error: live.security_event(
        EventType.MEMORY_EXHAUSTION,
        f"the state file cannot be written: {error}",
        at_most_every_s=DISK_FULL_EVENT_S,
    )

    async def control_handler(request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await handle_control(request, live, peer)

    # The control socket answers from the first moment: `evcp status` says what the agent
    # waits for (the clock, the hardware) instead of "not running".
    server = await serve_control(cfg.control_socket, control_handler)
    try:
        return await _serve(cfg, stop, live, password)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.control_socket.unlink()
        store.close()


async def _serve(cfg: Config, stop: asyncio.Event, live: Live, password: str) -> str | None:
    clock = live.clock
    servers = list(cfg.time["ntp_servers"])
    if servers:
        live.phase = "waiting for the clock (NTP)"
        synced = clock.wait_synchronized(servers, attempts=int(cfg.time["sync_attempts"]))
        if not await _unless_stopped(synced, stop):
            return None
    else:
        log.info("NTP disabled ([time] ntp_servers is empty): trusting the system clock")

    live.phase = "starting the hardware"
    hardware, sim = await build(cfg)
    live.sim = sim
    restart: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def request_restart(kind: str) -> None:
        if not restart.done():
            restart.set_result(kind)

    charger = assemble(
        cfg=cfg,
        store=live.store,
        keys=live.keys,
        clock=clock,
        hardware=hardware,
        request_restart=request_restart,
    )
    station = charger.station
    session = Session(cfg=cfg, charger=charger, password=password)
    uplink = _uplink_supervisor(cfg, session)
    live.uplink = uplink
    firmware_port = charger.features.firmware.port
    if isinstance(firmware_port, FirmwarePort):  # what a diagnostics bundle says of us
        firmware_port.summary = lambda: {
            **snapshot(charger, session_info(live, session), uplink_snapshot(live)),
            "database_integrity": live.store.integrity_check(),
        }
    restart_kind: str | None = None
    try:
        await charger.start()
        live.charger, live.session, live.phase = charger, session, RUNNING
        live.flush_events()
        sd_notify(f"READY=1\nSTATUS=evcp {__version__}: {len(hardware)} connector(s)")
        log.info("evcp %s running with %d connector(s)", __version__, len(hardware))
        me = asyncio.current_task()
        cancelling_before = me.cancelling() if me is not None else 0
        try:
            async with _startup_frozen(), asyncio.TaskGroup() as group:
                group.create_task(station.run(), name="station")
                group.create_task(_session(cfg, charger, session, uplink), name="session")
                if uplink is not None:
                    group.create_task(_supervise(uplink), name="uplink")
                group.create_task(_watchdog(), name="watchdog")
                if servers:
                    group.create_task(
                        clock.run_periodic(servers, float(cfg.time["sync_interval_s"])),
                        name="ntp",
                    )
                group.create_task(_until(stop, restart, station), name="until")
        except* _Stop:
            _undo_taskgroup_cancel(me, cancelling_before)
            station.note_orderly_stop()
        except* Restart as group:
            _undo_taskgroup_cancel(me, cancelling_before)
            first = group.exceptions[0]
            assert isinstance(first, Restart)
            restart_kind = first.kind
        return restart_kind
    finally:
        live.phase = "stopping"
        # A Reset restarts the agent in this process: that is a reload to systemd, not a
        # stop (STOPPING=1 would start the unit's stop timeout, and READY=1 then no longer
        # counts: SIGKILL after TimeoutStopSec).
        sd_notify("RELOADING=1" if restart_kind is not None else "STOPPING=1")
        await charger.close()
        if sim is not None:
            await sim.stop()


def _uplink_supervisor(cfg: Config, session: Session) -> UplinkClient | None:
    """The uplink supervisor, with ``[uplink]`` only: it runs in a child process (it needs
    pyroute2, ~12 MiB that stay out of the agent's memory); this is the agent's end."""
    if cfg.uplink is None:
        return None
    from agent.uplink.client import UplinkClient

    supervisor = UplinkClient(cfg)
    supervisor.attach(session)
    session.uplink = supervisor
    return supervisor


async def _session(
    cfg: Config, charger: ChargePoint, session: Session, uplink: UplinkClient | None
) -> None:
    """The CSMS connection; first, with a modem, ICCID and IMSI for BootNotification (for
    at most 5 s: a modem that does not answer does not keep the charger off the CSMS)."""
    ident = cfg.identity
    if uplink is not None and not (ident["iccid"] and ident["imsi"]):
        try:
            iccid, imsi = await uplink.identity(timeout_s=5)
        except Exception as exc:  # a modem's trouble never keeps the charger off the CSMS
            raise_if_cancelling()
            log.warning("uplink: no ICCID/IMSI for BootNotification: %s", exc)
        else:
            charger.features.core.set_modem_identity(iccid, imsi)
    await session.run()


async def _supervise(uplink: UplinkClient) -> None:
    """Run the uplink process (started again if it dies); a failure of it is logged and the
    agent carries on over whatever route the OS picks (cancelling it stops the process,
    which removes its route copy)."""
    try:
        await uplink.run()
    except Exception as exc:
        raise_if_cancelling()
        log.error("uplink supervisor stopped: %s: %s; the OS's routes apply",
                  type(exc).__name__, exc, exc_info=exc)  # fmt: skip


def uplink_snapshot(live: Live) -> dict[str, Any] | None:
    return live.uplink.snapshot() if live.uplink is not None else None


def _config_get(keys: ConfigKeys, names: Any) -> dict[str, Any]:
    """``evcp config get [KEY...]``: as GetConfiguration answers (write-only keys unknown)."""
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        return {"ok": False, "error": '"keys" must be a list of key names'}
    known, unknown = keys.get_configuration(names or None)
    values = {name: value for name, _readonly, value in known}
    readonly = sorted(name for name, ro, _value in known if ro)
    if unknown:
        return {"ok": False, "error": f"unknown key(s): {', '.join(unknown)}", "keys": values,
                "readonly": readonly, "unknown": unknown}  # fmt: skip
    return {"ok": True, "keys": values, "readonly": readonly}


def session_info(live: Live, session: Session) -> dict[str, Any]:
    """What the status adds from the agent's life: uptime, the clock, the session."""
    clock = live.clock
    age = clock.last_sync_age_s
    return {
        "uptime_s": round(time.monotonic() - live.started, 1),
        "clock": {
            "synchronized": clock.synchronized,
            "offset_s": round(clock.offset_s, 3),
            "last_sync_age_s": None if age is None else round(age, 1),
            "ntp_servers": list(live.cfg.time["ntp_servers"]),
        },
        "csms": {
            "registration": session.registration,
            "last_heartbeat": session.sender.last_heartbeat,
        },
    }


def _undo_taskgroup_cancel(task: asyncio.Task[Any] | None, before: int) -> None:
    """Python 3.11's TaskGroup leaves its parent task marked as cancelling when a child
    ends the group (our _Stop/Restart) while it waits -- fixed in 3.12. Undo exactly that,
    or ``raise_if_cancelling()`` would later take it for a real cancellation (after a
    Reset the next run happens in this same task when the agent is embedded). A real
    cancellation that arrived meanwhile (the group swallowed its CancelledError) is
    raised again."""
    if task is None or task.cancelling() <= before:
        return
    task.uncancel()  # the one request the group made itself
    if task.cancelling() > before:
        raise asyncio.CancelledError


async def _until(stop: asyncio.Event, restart: asyncio.Future[str], station: Station) -> None:
    stop_task: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {stop_task, restart}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if restart.done():
        raise Restart(restart.result())
    log.info("stopping on signal")
    # Energy off first, before the connection's closing handshake (up to 5 s) and the rest.
    await station.pause_controllers()
    raise _Stop


async def _watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return  # no watchdog, or it watches another process (sd_watchdog_enabled(3))
    interval = usec / 1e6 / 2
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


#: How long `evcp sim plug`/`unplug` waits for the agent to see the cable change.
SIM_SEEN_TIMEOUT_S = 5.0


async def _until_seen(charger: ChargePoint, connector_id: Any, plugged: bool) -> None:
    c = charger.station.connectors.get(connector_id) if isinstance(connector_id, int) else None
    if c is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SIM_SEEN_TIMEOUT_S
    while c.plugged != plugged and loop.time() < deadline:
        await asyncio.sleep(0.01)


RUNNING = "running"


@dataclass(slots=True)
class Live:
    """What the control socket answers from: filled in as the agent comes up."""

    cfg: Config
    store: Store
    keys: ConfigKeys
    clock: ClockGuard
    phase: str = "starting"
    started: float = field(default_factory=time.monotonic)
    charger: ChargePoint | None = None
    session: Session | None = None
    sim: SimProcess | None = None
    #: Security events seen before the charge point runs (a clock step at start).
    pending_events: list[tuple[EventType, str]] = field(default_factory=list)
    #: When each kind of event was last raised (monotonic), for those raised at most so often.
    _last_event: dict[EventType, float] = field(default_factory=dict)

    def security_event(self, event: EventType, info: str, *, at_most_every_s: float = 0.0) -> None:
        """Record a security event the agent saw (never from inside the caller: a store
        that is handling a write error must not be written to from its own callback).
        With ``at_most_every_s``, a repeat within that time is not raised again (a disk
        that fills, frees a page and fills again is one event, not one per write)."""
        now = time.monotonic()
        last = self._last_event.get(event)
        if at_most_every_s and last is not None and now - last < at_most_every_s:
            return
        self._last_event[event] = now
        self.pending_events.append((event, info))
        with contextlib.suppress(RuntimeError):  # (no running loop: kept until the start)
            asyncio.get_running_loop().call_soon(self.flush_events)

    def flush_events(self) -> None:
        if self.charger is None:
            return
        events, self.pending_events = self.pending_events, []
        for event, info in events:
            self.charger.features.security.raise_event(event, info)

    uplink: UplinkClient | None = None


#: A disk that keeps refusing writes is one MemoryExhaustion event an hour at most.
DISK_FULL_EVENT_S = 3600.0

#: Requests that change something: root (or the agent's own user) only.
CHANGING = frozenset({"queue-retry", "swipe", "sim", "config-set", "uplink-switch"})


async def handle_control(request: dict[str, Any], live: Live, peer: Peer) -> dict[str, Any]:
    """Answer one control-socket request (``evcp status``, ``evcp sim ...``)."""
    cmd = request["cmd"]
    if cmd in CHANGING and not peer.may_change():
        return {"ok": False, "error": f"only root may {cmd} (you are uid {peer.uid})"}
    charger, session, sim = live.charger, live.session, live.sim
    if cmd == "status":
        if charger is None or session is None:
            return {"ok": True, **starting_snapshot(live.cfg, live.store, live.phase)}
        return {"ok": True, **snapshot(charger, session_info(live, session), uplink_snapshot(live))}
    if cmd == "config-get":
        return _config_get(live.keys, request.get("keys"))
    if cmd == "uplink-switch":  # forcing a link is for root only (field testing)
        return await handle_switch(request, live.uplink, peer.uid)
    if cmd == "tx":
        last = request.get("last", 10)
        if not isinstance(last, int) or isinstance(last, bool) or not 1 <= last <= 10_000:
            return {"ok": False, "error": "--last takes a number from 1 to 10000"}
        return {"ok": True, "transactions": live.store.recent_transactions(last)}
    if charger is None or session is None:
        return {"ok": False, "error": f"the agent is {live.phase}: try again in a moment"}
    station = charger.station
    if cmd == "config-set":
        key, value = request.get("key"), request.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            return {"ok": False, "error": 'config-set needs a "key" and a "value" (strings)'}
        changed = live.keys.change_configuration(key, value).value
        shown = "<redacted>" if is_secret(key) else repr(value)
        log.warning("configuration key %s set to %s from the command line: %s", key, shown,
                    changed)  # fmt: skip
        if changed not in ("Accepted", "RebootRequired"):
            why = "unknown key" if changed == "NotSupported" else "read-only or invalid value"
            return {"ok": False, "status": changed, "error": f"{key}: {changed} ({why})"}
        session.apply_change(key, value)
        return {"ok": True, "status": changed}
    if cmd == "queue":
        pending, _failed = station.store.queue_counts()
        return {"ok": True, "pending": pending, "failed": failed_messages(station.store)}
    if cmd == "queue-retry":
        return {"ok": True, "requeued": retry_failed_messages(charger)}
    if cmd == "swipe":
        tag = request.get("tag")
        if not isinstance(tag, str) or not 1 <= len(tag) <= 20:
            return {"ok": False, "error": "an idTag is 1 to 20 characters"}
        connector = request.get("connector")
        if connector is not None and connector not in station.connectors:
            return {"ok": False, "error": f"no connector {connector}"}
        return {"ok": True, "result": await station.swipe(tag, connector)}
    if cmd == "schedule":
        connector = request.get("connector", 1)
        unit = request.get("unit", "A")
        hours = request.get("hours", 24)
        if connector != 0 and connector not in station.connectors:
            return {"ok": False, "error": f"no connector {connector}"}
        if unit not in ("A", "W") or not isinstance(hours, int | float) or not 0 < hours <= 168:
            return {"ok": False, "error": "unit must be A or W, hours 1 to 168"}
        result = charger.features.smart_charging.composite_schedule(
            connector, int(hours * 3600), unit
        )
        if result is None:
            return {"ok": False, "error": "no composite schedule for that connector"}
        return {"ok": True, "connector_id": connector, "schedule": result[1]}
    if cmd == "sim":
        if sim is None:
            return {
                "ok": False,
                "error": 'not running on simulated hardware ([hardware] driver = "sim")',
            }
        inner = request.get("request", {})
        if not isinstance(inner, dict):
            return {"ok": False, "error": '"request" must be an object, e.g. {"cmd": "plug"}'}
        forwarded = dict(inner)
        if forwarded.get("cmd") == "fault":
            code = forwarded.get("code")
            if code in SIM_FAULTS:
                forwarded["code"] = SIM_FAULTS[code].value
        answer = await sim.command(forwarded)
        if answer.get("ok") and forwarded.get("cmd") in ("plug", "unplug"):
            # Answer once the agent has seen the cable too (the controller reports it on
            # its own time): a swipe right after `evcp sim plug` then finds the car.
            await _until_seen(charger, forwarded.get("connector", 1), forwarded["cmd"] == "plug")
        return answer
    return {"ok": False, "error": f"unknown command {cmd!r}"}
