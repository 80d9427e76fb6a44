"""The agent's configuration file (TOML), validated in full at start.

Every problem is reported as a :class:`ConfigError` that names the file and the key, e.g.
``/etc/evcp/evcp.toml: [csms] url: must start with wss://``; the CLI prints it and exits 2.
The schema below is the single source of truth: the example config in ``etc/`` documents
the same keys.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid. Exit status 2."""


# A key spec: (type, default). A default of REQUIRED means the key must be given.
class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

Validator = Callable[[Any], str | None]


@dataclass(frozen=True, slots=True)
class Key:
    type: type | tuple[type, ...]
    default: Any = REQUIRED
    check: Validator | None = None
    doc: str = ""


#: The longest path a Unix socket can have (sun_path is 108 bytes with its terminator).
MAX_SOCKET_PATH = 107


def _tcp_port(value: Any) -> bool:
    """1-65535, as a number or a string of one ("502")."""
    if isinstance(value, bool):
        return False
    try:
        port = int(value)
    except ValueError:
        return False
    return 1 <= port <= 65535


def _one_of(*choices: str) -> Validator:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def _range(lo: float, hi: float) -> Validator:
    def check(value: Any) -> str | None:
        return None if lo <= value <= hi else f"must be between {lo:g} and {hi:g}"

    return check


def _zero_or_range(lo: float, hi: float) -> Validator:
    def check(value: Any) -> str | None:
        return None if value == 0 or lo <= value <= hi else f"must be 0 or {lo:g} to {hi:g}"

    return check


def _wss_url(value: Any) -> str | None:
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if port == 0:
        return "has an invalid port"
    if parts.scheme == "ws":
        return (
            "must start with wss://: OCPP over plain ws:// is refused "
            "(the Basic Auth password would travel in clear)"
        )
    if parts.scheme != "wss" or not parts.hostname:
        return "must be a wss:// URL with a host, e.g. wss://csms.example.com/ocpp"
    if parts.username or parts.password:
        return "must not carry credentials; set [csms] password instead"
    if parts.query or parts.fragment:
        return "must not have a query or fragment (the charge point id is appended to the path)"
    return None


def _http_proxy(value: Any) -> str | None:
    """What websockets' proxy support accepts, so that a bad value fails here, not at every
    connection attempt."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be empty (direct) or an http:// or https:// proxy URL, e.g. http://proxy:3128"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has an invalid port (expected http://host:port)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be http://host:port only (no path, query or fragment)"
    if parts.username is not None and parts.password is None:
        return "has a user name without a password (http://user:password@host:port)"
    return None


_CP_ID = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]{1,48}$")


def _cp_id(value: Any) -> str | None:
    if not _CP_ID.match(value):
        return "must be 1-48 URL-safe characters (no '/', spaces or '%')"
    return None


def _password(value: Any) -> str | None:
    if not 16 <= len(value) <= 40:
        return "must be 16 to 40 characters (OCPP security whitepaper, AuthorizationKey)"
    return None


def _id_tag_or_empty(value: Any) -> str | None:
    if len(value) > 20 or (value and not value.isprintable()):
        return "must be empty or an idTag of 1 to 20 printable characters (OCPP CiString20)"
    return None


def _ntp_list(value: Any) -> str | None:
    if not all(isinstance(item, str) and item for item in value):
        return "must be a list of host names or host:port strings"
    return None


SCHEMA: dict[str, dict[str, Key]] = {
    "csms": {
        "url": Key(str, check=_wss_url, doc="wss:// URL; /<charge_point_id> is appended"),
        "charge_point_id": Key(str, check=_cp_id),
        "password": Key(str, check=_password, doc="initial AuthorizationKey (Basic Auth)"),
        "ca_file": Key(str, "", doc="CA bundle for the CSMS certificate; empty: system store"),
        "proxy": Key(str, "", _http_proxy, doc="http://host:port of an HTTP CONNECT proxy"),
        "response_timeout_s": Key((int, float), 30, _range(1, 600)),
        "reconnect_min_s": Key((int, float), 1, _range(0.05, 3600)),
        "reconnect_max_s": Key((int, float), 300, _range(0.1, 86400)),
    },
    "agent": {
        "state_dir": Key(str, "/var/lib/evcp"),
        "control_socket": Key(str, "/run/evcp/control.sock"),
        "log_level": Key(str, "info", _one_of("debug", "info", "warning", "error")),
        "log_target": Key(str, "auto", _one_of("auto", "journal", "stderr")),
        "reboot_command": Key(str, "", doc="run on a Hard Reset; empty: restart the agent"),
        "queue_max_messages": Key(
            int,
            100_000,
            _range(100, 10_000_000),
            doc="outbound queue size before MeterValues are thinned",
        ),
        "queue_flush_s": Key(
            (int, float),
            10,
            _zero_or_range(10, 86400),
            doc="N: MeterValues are staged in stage_dir (RAM) and those not acknowledged"
            " within N s go to disk; 0: every transaction message is on disk before it is sent",
        ),
        "stage_dir": Key(str, "/run/evcp", doc="where MeterValues are staged (a tmpfs)"),
        "free_vend_id_tag": Key(
            str,
            "",
            _id_tag_or_empty,
            doc="plugging a car in starts a transaction with this idTag; empty: off",
        ),
    },
    "time": {
        "ntp_servers": Key(list, REQUIRED, _ntp_list, doc="empty list: no NTP"),
        "step_system_clock": Key(bool, False),
        "sync_attempts": Key(int, 3, _range(1, 100)),
        "sync_interval_s": Key((int, float), 3600, _range(1, 86400 * 7)),
        "timeout_s": Key((int, float), 2, _range(0.1, 30)),
    },
    "identity": {
        "vendor": Key(str, "evcp"),
        "model": Key(str, "evcp-charger"),
        "serial_number": Key(str, ""),
        "charge_box_serial_number": Key(str, ""),
        "meter_type": Key(str, ""),
        "meter_serial_number": Key(str, ""),
        "iccid": Key(str, ""),
        "imsi": Key(str, ""),
    },
    "hardware": {
        "driver": Key(str, "devices", _one_of("sim", "devices")),
        "connectors": Key(int, 1, _range(1, 8)),
        "max_current_a": Key((int, float), 32, _range(6, 80)),
        "phases": Key(int, 3, _range(1, 3)),
        "nominal_voltage_v": Key((int, float), 230, _range(100, 480)),
        "meter_miss_limit": Key(int, 3, _range(1, 100)),
        "meter_poll_s": Key((int, float), 10, _range(0.1, 3600)),
        "cable": Key(str, "tethered", _one_of("tethered", "socket")),
    },
    "meter": {
        "model": Key(str, "sdm630", doc="sdm630, sdm120, abb_b23, em340 or a map file path"),
        "transport": Key(str, "tcp", _one_of("tcp", "rtu")),
        "host": Key(str, "127.0.0.1"),
        "port": Key((int, str), 502, doc="TCP port, or serial device for RTU"),
        "unit_id": Key(int, 1, _range(1, 247)),
        "baudrate": Key(int, 9600, _range(300, 921600)),
        "timeout_s": Key((int, float), 1.0, _range(0.05, 30)),
        "retries": Key(int, 1, _range(0, 10)),
    },
    "evse": {
        "driver": Key(str, "rapi", _one_of("rapi")),
        "port": Key(str, "/dev/ttyS0"),
        "baudrate": Key(int, 115200, _range(300, 921600)),
        "timeout_s": Key((int, float), 1.0, _range(0.05, 30)),
        "fallback_current_a": Key(int, 6, _range(6, 80)),
    },
    "firmware": {
        "ca_file": Key(
            str,
            "",
            doc="CA bundle for https:// and ftps:// firmware and diagnostics; empty: system store",
        ),
        "allow_http": Key(bool, False, doc="accept http:// and ftp:// (no TLS) locations"),
        "install_command": Key(
            str,
            "",
            doc="replaces the dpkg step, run by the installer as root; {file} is the update",
        ),
        "rollback_after_s": Key(
            (int, float),
            300,
            _range(10, 86400),
            doc="the new version must reach BootNotification Accepted within this, or it is rolled back",
        ),
        "spool_dir": Key(
            str, "", doc="downloads and the installer's hand-over; empty: state_dir/firmware"
        ),
        "upload_method": Key(str, "put", _one_of("put", "post"), doc="HTTP(S) diagnostics upload"),
        "default_retries": Key(
            int, 3, _range(1, 100), doc="attempts when the CSMS gives no retries"
        ),
        "default_retry_interval_s": Key((int, float), 60, _range(1, 86400)),
        "transfer_timeout_s": Key((int, float), 60, _range(1, 3600), doc="per network read"),
    },
    "sim": {
        "time_scale": Key((int, float), 1.0, _range(0.01, 100000)),
        "ev_max_current_a": Key((int, float), 32, _range(0, 80)),
        "ev_phases": Key(int, 3, _range(1, 3)),
        "meter_model": Key(str, "sdm630"),
        "meter_transport": Key(str, "tcp", _one_of("tcp", "rtu")),
        "voltage_v": Key((int, float), 230, _range(100, 480)),
    },
    "security": {
        "key_algorithm": Key(
            str,
            "ec-p256",
            _one_of("ec-p256", "rsa-2048"),
            doc="the key the charger makes for its certificate (SignCertificate)",
        ),
        "profile_fallback_s": Key(
            (int, float),
            60,
            _range(5, 3600),
            doc="a new SecurityProfile or certificate that has not connected by then is undone",
        ),
        "log_max_kib": Key(int, 256, _range(16, 65536), doc="security log size before rotation"),
        "log_files": Key(int, 3, _range(1, 20), doc="rotated security logs kept"),
        "crypto": Key(
            str,
            "helper",
            _one_of("helper", "inprocess"),
            doc="helper: certificate work in a child process (keeps the agent small)",
        ),
    },
}

#: Sections whose keys are free-form: initial values of OCPP configuration keys.
FREE_SECTIONS = {"ocpp"}

#: ``[uplink]``: optional. Without it the agent uses whatever route the OS picks (as before).
UPLINK_KEYS: dict[str, Key] = {
    "backend": Key(str, "route", _one_of("route", "networkmanager")),
    "hold_s": Key(
        (int, float),
        60,
        _range(1, 86400),
        doc="a better link must be healthy this long before the agent moves back to it",
    ),
    "probe_interval_s": Key((int, float), 2, _range(0.2, 3600)),
    "probe_timeout_s": Key((int, float), 1.5, _range(0.1, 60)),
    "failures_to_down": Key(int, 3, _range(1, 100)),
    "successes_to_up": Key(int, 3, _range(1, 100)),
    "gsm_probe_interval_s": Key(
        (int, float), 300, _range(1, 86400), doc="steady-state probing of gsm links (costs data)"
    ),
    "gsm_ping_interval_s": Key(
        (int, float), 240, _range(0, 86400), doc="WebSocket ping interval over gsm; 0: none"
    ),
    "probe_tls": Key(bool, False, doc="probe with a TLS handshake, not only a TCP connect"),
    "links": Key(list, REQUIRED),
}

UPLINK_LINK_KEYS: dict[str, Key] = {
    "name": Key(str, REQUIRED),
    "interface": Key(str, REQUIRED),
    "kind": Key(str, REQUIRED, _one_of("wifi", "gsm", "ethernet")),
    "priority": Key(int, REQUIRED, _range(1, 1000)),
    "at_port": Key(str, "", doc="the modem's AT command port (gsm), e.g. /dev/ttyUSB2"),
    "at_baudrate": Key(int, 115200, _range(300, 921600)),
}

_LINK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: Linux interface names: 1-15 bytes, no '/', ':' or whitespace.
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")


@dataclass(frozen=True, slots=True)
class UplinkLink:
    """One ``[[uplink.links]]`` entry. A lower ``priority`` number is preferred."""

    name: str
    interface: str
    kind: str
    priority: int
    at_port: str = ""
    at_baudrate: int = 115200


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    """The validated ``[uplink]`` section."""

    backend: str
    hold_s: float
    probe_interval_s: float
    probe_timeout_s: float
    failures_to_down: int
    successes_to_up: int
    gsm_probe_interval_s: float
    gsm_ping_interval_s: float
    probe_tls: bool
    links: tuple[UplinkLink, ...]

    def link(self, name: str) -> UplinkLink:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration. Sections are plain dicts of validated values."""

    path: Path
    csms: Mapping[str, Any]
    agent: Mapping[str, Any]
    time: Mapping[str, Any]
    identity: Mapping[str, Any]
    hardware: Mapping[str, Any]
    meter: Mapping[str, Any]
    evse: Mapping[str, Any]
    sim: Mapping[str, Any]
    ocpp: Mapping[str, Any] = field(default_factory=dict)
    security: Mapping[str, Any] = field(default_factory=dict)
    firmware: Mapping[str, Any] = field(default_factory=dict)
    #: None: no ``[uplink]`` section, the OS's routing is left alone.
    uplink: UplinkConfig | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.agent["state_dir"])

    @property
    def firmware_dir(self) -> Path:
        """Where firmware downloads, diagnostics bundles and the installer hand-over live."""
        spool = self.firmware.get("spool_dir", "")
        return Path(spool) if spool else self.state_dir / "firmware"

    @property
    def control_socket(self) -> Path:
        return Path(self.agent["control_socket"])

    @property
    def connector_ids(self) -> list[int]:
        return list(range(1, int(self.hardware["connectors"]) + 1))


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
    }
    if isinstance(expected, tuple):
        if set(expected) == {int, float}:
            return "a number"
        return " or ".join(names.get(t, t.__name__) for t in expected)
    return names.get(expected, expected.__name__)


def _is_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        return False  # TOML true is not an integer here
    return isinstance(value, types)


def validate(data: Mapping[str, Any], path: Path) -> Config:
    """Check ``data`` (parsed TOML) against :data:`SCHEMA`; raise ConfigError on the first issue.

    Relative paths in ``agent.state_dir``, ``agent.control_socket`` and ``csms.ca_file`` are
    resolved against the config file's directory.
    """

    def fail(where: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {where}: {message}")

    for section in data:
        if section not in SCHEMA and section not in FREE_SECTIONS and section != "uplink":
            known = ", ".join(f"[{s}]" for s in [*SCHEMA, *sorted(FREE_SECTIONS), "uplink"])
            raise fail(f"[{section}]", f"unknown section (known: {known})")
    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise fail(f"[{section}]", "must be a table")
        for key in given:
            if key not in keys:
                raise fail(f"[{section}] {key}", f"unknown key (known: {', '.join(keys)})")
        values: dict[str, Any] = {}
        for key, spec in keys.items():
            if key not in given:
                if spec.default is REQUIRED:
                    raise fail(f"[{section}] {key}", "missing value (this key is required)")
                values[key] = spec.default
                continue
            value = given[key]
            if not _is_type(value, spec.type):
                shown = "" if key == "password" else f" {value!r}"
                raise fail(
                    f"[{section}] {key}",
                    f"must be {_type_name(spec.type)}, not {type(value).__name__}{shown}",
                )
            if spec.check is not None and (problem := spec.check(value)) is not None:
                raise fail(f"[{section}] {key}", problem)
            values[key] = value
        sections[section] = values
    ocpp_keys = data.get("ocpp", {})
    if not isinstance(ocpp_keys, dict):
        raise fail("[ocpp]", "must be a table of OCPP configuration keys")
    from agent.features.registry import ConfigKeys

    for key, value in ocpp_keys.items():
        if not isinstance(value, str | int | float | bool | list):
            raise fail(f"[ocpp] {key}", "must be a string, number, boolean or list")
    try:
        ConfigKeys(overrides=dict(ocpp_keys))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    from drivers.meter.maps import is_model_name

    base = path.parent
    for section, key in (
        ("agent", "state_dir"),
        ("agent", "stage_dir"),
        ("agent", "control_socket"),
        ("csms", "ca_file"),
        ("firmware", "ca_file"),
        ("firmware", "spool_dir"),
    ):
        raw = sections[section][key]
        if raw and not os.path.isabs(raw):
            sections[section][key] = str((base / raw).resolve())
    for section, key in (("meter", "model"), ("sim", "meter_model")):
        raw = sections[section][key]  # a map file is relative to the config file, too
        if raw and not is_model_name(raw) and not os.path.isabs(raw):
            sections[section][key] = str((base / raw).resolve())
    if sections["csms"]["reconnect_min_s"] > sections["csms"]["reconnect_max_s"]:
        raise fail("[csms] reconnect_min_s", "must not exceed reconnect_max_s")
    if sections["csms"]["ca_file"] and not Path(sections["csms"]["ca_file"]).is_file():
        raise fail("[csms] ca_file", f"no such file: {sections['csms']['ca_file']}")
    if sections["firmware"]["ca_file"] and not Path(sections["firmware"]["ca_file"]).is_file():
        raise fail("[firmware] ca_file", f"no such file: {sections['firmware']['ca_file']}")
    command = sections["firmware"]["install_command"]
    if command and "{file}" not in command:
        raise fail("[firmware] install_command", "must contain {file} (the downloaded update)")
    if sections["hardware"]["driver"] == "devices" and sections["hardware"]["connectors"] != 1:
        raise fail(
            "[hardware] connectors",
            'driver = "devices" drives one connector per [meter]/[evse] pair: set 1',
        )
    meter_port = sections["meter"]["port"]
    devices = sections["hardware"]["driver"] == "devices"
    if devices and sections["meter"]["transport"] == "tcp" and not _tcp_port(meter_port):
        raise fail("[meter] port", 'must be a TCP port number 1-65535 with transport = "tcp"')
    if (
        devices
        and sections["meter"]["transport"] == "rtu"
        and not (isinstance(meter_port, str) and meter_port)
    ):
        raise fail("[meter] port", 'must be a serial device (e.g. "/dev/ttyUSB0") with "rtu"')
    if not devices and len(os.fsencode(sections["agent"]["state_dir"])) + 9 > MAX_SOCKET_PATH:
        raise fail(  # the simulators' socket is state_dir/sim.sock
            "[agent] state_dir",
            f"path longer than {MAX_SOCKET_PATH - 9} bytes: the simulators' socket in it"
            " would exceed the Unix limit",
        )
    if len(os.fsencode(sections["agent"]["control_socket"])) > MAX_SOCKET_PATH:
        raise fail(
            "[agent] control_socket", f"path longer than {MAX_SOCKET_PATH} bytes (a Unix limit)"
        )
    uplink = _uplink(data["uplink"], fail) if "uplink" in data else None
    return Config(path=path, ocpp=dict(ocpp_keys), uplink=uplink, **sections)


def _check_table(
    given: Any, keys: Mapping[str, Key], where: str, fail: Callable[[str, str], ConfigError]
) -> dict[str, Any]:
    """Validate one table against ``keys`` (types, checks, defaults); ``where`` names it."""
    if not isinstance(given, dict):
        raise fail(where, "must be a table")
    for key in given:
        if key not in keys:
            raise fail(f"{where} {key}", f"unknown key (known: {', '.join(keys)})")
    values: dict[str, Any] = {}
    for key, spec in keys.items():
        if key not in given:
            if spec.default is REQUIRED:
                raise fail(f"{where} {key}", "missing value (this key is required)")
            values[key] = spec.default
            continue
        value = given[key]
        if not _is_type(value, spec.type):
            raise fail(
                f"{where} {key}",
                f"must be {_type_name(spec.type)}, not {type(value).__name__} {value!r}",
            )
        if spec.check is not None and (problem := spec.check(value)) is not None:
            raise fail(f"{where} {key}", problem)
        values[key] = value
    return values


def _uplink(given: Any, fail: Callable[[str, str], ConfigError]) -> UplinkConfig:
    values = _check_table(given, UPLINK_KEYS, "[uplink]", fail)
    raw_links = values.pop("links")
    if not raw_links:
        raise fail("[uplink] links", "needs at least one [[uplink.links]] entry")
    links: list[UplinkLink] = []
    for index, raw in enumerate(raw_links):
        where = f"[[uplink.links]] #{index + 1}"
        link = _check_table(raw, UPLINK_LINK_KEYS, where, fail)
        if not _LINK_NAME.match(link["name"]):
            raise fail(f"{where} name", "must be 1-32 letters, digits, '-' or '_'")
        if not _IFNAME.match(link["interface"]):
            raise fail(f"{where} interface", "must be a Linux interface name (1-15 characters)")
        for other in links:
            for key in ("name", "interface", "priority"):
                if link[key] == getattr(other, key):
                    raise fail(
                        f"{where} {key}", f"{link[key]!r} is already used by link {other.name!r}"
                    )
        if link["at_port"] and link["kind"] != "gsm":
            raise fail(f"{where} at_port", 'only a kind = "gsm" link has a modem AT port')
        links.append(UplinkLink(**link))
    if values["probe_timeout_s"] >= values["probe_interval_s"]:
        raise fail("[uplink] probe_timeout_s", "must be shorter than probe_interval_s")
    return UplinkConfig(
        backend=values["backend"],
        hold_s=float(values["hold_s"]),
        probe_interval_s=float(values["probe_interval_s"]),
        probe_timeout_s=float(values["probe_timeout_s"]),
        failures_to_down=values["failures_to_down"],
        successes_to_up=values["successes_to_up"],
        gsm_probe_interval_s=float(values["gsm_probe_interval_s"]),
        gsm_ping_interval_s=float(values["gsm_ping_interval_s"]),
        probe_tls=values["probe_tls"],
        links=tuple(sorted(links, key=lambda link: link.priority)),
    )


def check_meter_map(cfg: Config) -> None:
    """Load the meter register map the config names (``[meter] model``, or ``[sim]
    meter_model`` for the simulators) and report a bad one as a config error. Separate from
    :func:`load` because it imports the Modbus driver: ``run``, ``check-config`` and
    ``probe`` call it; ``status`` and ``sim`` do not need it."""
    from drivers.base import DriverError
    from drivers.meter.maps import load_map

    section = "sim" if cfg.hardware["driver"] == "sim" else "meter"
    key = "meter_model" if section == "sim" else "model"
    model = str(getattr(cfg, section)[key])
    try:
        load_map(model)
    except DriverError as exc:
        raise ConfigError(f"{cfg.path}: [{section}] {key}: {exc}") from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError naming the file and key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return validate(data, p.resolve())


#: The identity and password the shipped example config (etc/evcp.toml, the package's
#: /etc/evcp/evcp.toml) carries: a charger must not contact a CSMS with them.
PLACEHOLDERS: dict[str, str] = {
    "charge_point_id": "EVCP-000123",
    "password": "change-me-16-chars-min",
}


def check_placeholders(cfg: Config) -> None:
    """Refuse the example's placeholder CSMS URL, charge point id and password, naming
    every one still to be set (``run`` and ``check-config`` call it: exit status 2)."""
    left = [key for key, value in PLACEHOLDERS.items() if cfg.csms[key] == value]
    if left:
        raise ConfigError(
            f"{cfg.path}: [csms] {', '.join(left)}: still the shipped example value"
            f"{'s' if len(left) > 1 else ''}: set this charger's charge_point_id and password"
            " (the initial AuthorizationKey), and the CSMS url, before starting the agent"
        )
