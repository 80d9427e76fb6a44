"""``evcp selftest``: the commissioning checklist, run on the charger itself.

Each check gives ``{"name", "passed", "required", "detail"}``; the command exits 0 only when
every required check passed. ``--offline`` marks the network checks (dns, csms-tls,
csms-auth) as not required and skips them.

- ``clock``: the system time is plausible (not before :data:`CLOCK_FLOOR`) and whether the
  kernel says it is synchronised (adjtimex); ``clock-sync`` requires that (online only).
- ``dns``: the CSMS host name resolves.
- ``csms-tls``: a TLS 1.2 handshake with the configured CA, offering only the agent's
  ELBSecurityPolicy-TLS-1-2-Ext-2018-06 cipher suites; the certificate and host name are
  checked.
- ``csms-auth``: the WebSocket upgrade with Basic Auth (the AuthorizationKey the CSMS set,
  kept in the state file, else ``[csms] password``) is accepted; a 401 says so. The CSMS
  sees a short connection of this charge point (a running agent's session may be replaced
  by it, and reconnects).
- ``meter`` / ``controller``: answered with plausible values. With a running agent its
  status is used (a second Modbus master or RAPI client on the same line would disturb it);
  else the devices are probed once, as ``evcp probe`` does.
- ``disk``: free space where the state lives; ``database``: the state file's integrity
  (``PRAGMA quick_check``, read-only).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import shutil
import socket
import sqlite3
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.config import Config

#: A clock before this is certainly wrong (no RTC battery, never synchronised).
CLOCK_FLOOR = time.mktime((2026, 1, 1, 0, 0, 0, 0, 0, 0))
#: Less free space than this under the state directory fails the disk check.
MIN_FREE_BYTES = 64 * 1024 * 1024
NETWORK_TIMEOUT_S = 10.0
#: Voltages a meter on a 230/400 V or 120/240 V grid can plausibly report (0: phase absent).
VOLTAGE_RANGE = (80.0, 300.0)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    required: bool
    detail: str


class _Timex(ctypes.Structure):
    # struct timex (adjtimex(2)): the fields up to status, then room for the rest.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


TIME_ERROR = 5  # adjtimex's answer when the clock is not synchronised


def clock_synchronised() -> bool | None:
    """The kernel's view (what timedatectl's "System clock synchronized" shows); None when
    it cannot be asked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        state = int(libc.adjtimex(ctypes.byref(_Timex())))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != TIME_ERROR


def check_clock(now: float, synchronised: bool | None) -> list[Check]:
    sane = now >= CLOCK_FLOOR
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    sync = {True: "synchronised", False: "not synchronised", None: "sync state unknown"}
    detail = f"{stamp}, {sync[synchronised]}"
    if not sane:
        detail += f" (before {time.strftime('%Y-%m-%d', time.gmtime(CLOCK_FLOOR))}: wrong)"
    return [Check("clock", sane, True, detail)]


def _host_port(cfg: Config) -> tuple[str, int]:
    parts = urlsplit(cfg.csms["url"])
    return str(parts.hostname), parts.port or 443


def check_dns(cfg: Config) -> Check:
    host, port = _host_port(cfg)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check("dns", False, True, f"{host} does not resolve: {exc.strerror or exc}")
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check("dns", True, True, f"{host} -> {', '.join(addresses[:4])}")


async def check_tls(cfg: Config) -> Check:
    from agent.ocpp.transport import TLS12_CIPHERS, tls_context

    host, port = _host_port(cfg)
    ctx = tls_context(cfg.csms["ca_file"] or None)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ca = cfg.csms["ca_file"] or "the system trust store"
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host),
            NETWORK_TIMEOUT_S,
        )
    except ssl.SSLCertVerificationError as exc:
        return Check("csms-tls", False, True, f"{host}:{port}: certificate refused ({ca}): "
                     f"{exc.verify_message}")  # fmt: skip
    except ssl.SSLError as exc:
        return Check("csms-tls", False, True, f"{host}:{port}: no TLS 1.2 handshake with the "
                     f"ELB-2018-06 cipher suites: {exc.reason or exc}")  # fmt: skip
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Check("csms-tls", False, True, f"{host}:{port}: cannot connect: {reason}")
    try:
        info = writer.get_extra_info("ssl_object")
        version, cipher = info.version(), info.cipher()[0]
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    ok = version == "TLSv1.2" and cipher in TLS12_CIPHERS.split(":")
    return Check("csms-tls", ok, True, f"{host}:{port} {version} {cipher}, CA {ca}")


def _password(cfg: Config) -> tuple[str, str]:
    """The AuthorizationKey the agent would use: the state file's, else the config's."""
    path = cfg.state_dir / "evcp.db"
    if path.exists():
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
            try:
                row = db.execute("SELECT value FROM kv WHERE key = 'csms.password'").fetchone()
            finally:
                db.close()
            if row and row[0]:
                return str(row[0]), "the AuthorizationKey set by the CSMS"
        except sqlite3.Error:
            pass
    return cfg.csms["password"], "[csms] password"


async def check_auth(cfg: Config) -> Check:
    from websockets.exceptions import InvalidStatus

    from agent.ocpp.transport import open_connection, tls_context

    password, source = _password(cfg)
    try:
        ws = await open_connection(
            url=cfg.csms["url"],
            charge_point_id=cfg.csms["charge_point_id"],
            password=password,
            ssl_context=tls_context(cfg.csms["ca_file"] or None),
            ping_interval_s=0,
            open_timeout_s=NETWORK_TIMEOUT_S,
            proxy=cfg.csms["proxy"],
        )
    except InvalidStatus as exc:
        code = exc.response.status_code
        if code == 401:
            return Check("csms-auth", False, True, f"HTTP 401: the CSMS refused charge point "
                         f"{cfg.csms['charge_point_id']!r} with {source}")  # fmt: skip
        return Check("csms-auth", False, True, f"the CSMS answered HTTP {code}")
    except Exception as exc:
        return Check("csms-auth", False, True, f"no WebSocket connection: {exc}")
    await ws.close()
    return Check("csms-auth", True, True,
                 f"Basic Auth accepted for {cfg.csms['charge_point_id']!r} ({source})")  # fmt: skip


def _plausible_meter(reading: dict[str, Any]) -> str | None:
    if reading["energy_wh"] < 0:
        return f"negative energy register {reading['energy_wh']} Wh"
    lo, hi = VOLTAGE_RANGE
    bad = [v for v in reading["voltage_v"] if v and not lo <= v <= hi]
    if bad:
        return f"implausible voltage {bad[0]} V"
    return None


def check_devices(cfg: Config, status: dict[str, Any] | None) -> list[Check]:
    """Meter and controller: from the running agent's status, else probed once."""
    if status is not None:
        connectors = status.get("connectors", [])
        faulted = [c for c in connectors if c.get("error_code", "NoError") != "NoError"]
        meter_ok = not any(c["error_code"] == "PowerMeterFailure" for c in faulted)
        controller_ok = not any(c["error_code"] != "PowerMeterFailure" for c in faulted)
        energy = ", ".join(f"#{c['id']} {c['energy_wh']:.0f} Wh" for c in connectors)
        states = ", ".join(
            f"#{c['id']} {c['status']}"
            + ("" if c["error_code"] == "NoError" else f" ({c['error_code']})")
            for c in connectors
        )
        return [
            Check("meter", meter_ok, True, f"running agent: {energy}"),
            Check("controller", controller_ok, True, f"running agent: {states}"),
        ]
    from agent.probe import probe_once

    checks = []
    for name, device in (("meter", "meter"), ("controller", "evse")):
        try:
            result = probe_once(cfg, device)
        except Exception as exc:
            checks.append(Check(name, False, True, f"no answer: {exc}"))
            continue
        if device == "meter":
            problem = _plausible_meter(result)
            detail = (
                f"{result['energy_wh']:.0f} Wh, {result['power_w']:.0f} W, "
                f"{'/'.join(f'{v:.0f}' for v in result['voltage_v'])} V"
            )
            checks.append(Check(name, problem is None, True, problem or detail))
        else:
            detail = f"{result['state']}, firmware {result['firmware']}"
            checks.append(Check(name, True, True, detail))
    return checks


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg: Config) -> Check:
    where = _existing(cfg.state_dir)
    usage = shutil.disk_usage(where)
    free_mib = usage.free / 2**20
    ok = usage.free >= MIN_FREE_BYTES
    return Check("disk", ok, True, f"{free_mib:.0f} MiB free under {where}"
                 + ("" if ok else f" (needs {MIN_FREE_BYTES // 2**20} MiB)"))  # fmt: skip


def check_database(cfg: Config, *, agent_running: bool = False) -> Check:
    path = cfg.state_dir / "evcp.db"
    if not path.exists():
        return Check("database", True, True, f"{path}: none yet (made at the agent's first start)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            result = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        if agent_running and "locked" in str(exc):
            # The agent holds the file exclusively; it ran PRAGMA quick_check on opening it
            # (a corrupt file is moved aside and logged then).
            return Check("database", True, True, f"{path}: held by the running agent, which"
                         " checked it (quick_check) when it opened it")  # fmt: skip
        return Check("database", False, True, f"{path}: cannot be read: {exc}")
    ok = result == ["ok"]
    return Check("database", ok, True, f"{path}: " + ("ok" if ok else "; ".join(result[:3])))


def run(cfg: Config, *, offline: bool, status: dict[str, Any] | None) -> dict[str, Any]:
    """All checks; ``status`` is the running agent's answer, or None when it is not running."""
    checks = check_clock(time.time(), clock_synchronised())
    if offline:
        for name in ("dns", "csms-tls", "csms-auth"):
            checks.append(Check(name, False, False, "skipped (--offline)"))
    else:
        sync = clock_synchronised()
        checks.append(Check("clock-sync", sync is True, True,
                            "synchronised" if sync else "the kernel says the clock is not synchronised"))  # fmt: skip
        dns = check_dns(cfg)
        checks.append(dns)
        if dns.passed:
            checks.append(asyncio.run(check_tls(cfg)))
            checks.append(asyncio.run(check_auth(cfg)))
        else:
            checks += [Check(n, False, True, "not tried: the name does not resolve")
                       for n in ("csms-tls", "csms-auth")]  # fmt: skip
    checks += check_devices(cfg, status)
    checks.append(check_disk(cfg))
    checks.append(check_database(cfg, agent_running=status is not None))
    passed = all(c.passed for c in checks if c.required)
    return {"passed": passed, "checks": [asdict(c) for c in checks]}


def table(result: dict[str, Any]) -> str:
    lines = []
    for c in result["checks"]:
        mark = "PASS" if c["passed"] else ("FAIL" if c["required"] else "skip")
        lines.append(f"{mark:<5} {c['name']:<11} {c['detail']}")
    lines.append("")
    lines.append("selftest passed" if result["passed"] else "selftest FAILED")
    return "\n".join(lines)
