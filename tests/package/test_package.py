"""The Debian package on a clean bookworm root, as a manufacturer ships it and a charger runs it.

``make deb`` builds the package once per run (and once more from a copy with the version
bumped, for the upgrade); a minimal bookworm root is debootstrapped once and cached as a
tarball under /var/cache/evcp-package-test (from the mirror this machine's apt uses), and
each test unpacks a fresh copy. Commands run in the root through chroot with its own
/proc and /dev/pts (an unshared mount namespace); where systemd-nspawn can boot the root
(``--register=no --keep-unit --private-network``), the service is started under systemd.

Skips, with the reason, only what this machine cannot do: not root, no build tools, no
mirror, or (for the boot test) an nspawn that cannot boot a root here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "package-test"
CACHE = Path(os.environ.get("EVCP_PACKAGE_ROOT_CACHE", "/var/cache/evcp-package-test"))
PRISTINE = CACHE / "bookworm-root.tar"
#: What the root needs to install the package without the network, and to boot.
ROOT_PACKAGES = "systemd,systemd-sysv,dbus,python3.11,adduser,libsystemd0"
BUILD_TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "debootstrap", "unshare", "chroot")

CONFIG = """
[csms]
url = "wss://csms.invalid/ocpp"
charge_point_id = "CP-PKG-1"
password = "package-test-password-1"

[agent]
log_target = "stderr"

[time]
ntp_servers = []

[identity]
vendor = "evcp-test"
model = "pkg"
serial_number = "SN-PKG"

[hardware]
driver = "sim"
connectors = 1
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, dpkg in a root)"
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed (apt-get install debhelper dh-virtualenv"
            " debootstrap systemd-container lintian)"
        )
    return None


pytestmark = [
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
    # Two package builds and (once per machine) a debootstrap: minutes, not the suite's 120 s.
    pytest.mark.timeout(1800),
]


def sh(*cmd: str | Path, check: bool = True, timeout: float = 900, **kw: object) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for match in re.finditer(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text):
                uri = match.group(1)
                if re.search(r"/debian/?$", uri):
                    return uri
    return "http://deb.debian.org/debian"


# ---------------------------------------------------------------------------------- builds


def _bump(src: Path, version: str) -> None:
    init = src / "agent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    changelog = src / "debian" / "changelog"
    entry = (
        f"evcp ({version}) unstable; urgency=medium\n\n  * Package test: the next version.\n\n"
        " -- evcp developers <evcp@example.invalid>  Mon, 07 Dec 2026 00:00:00 +0000\n\n"
    )
    changelog.write_text(entry + changelog.read_text())


@pytest.fixture(scope="module")
def debs() -> tuple[Path, Path]:
    """(this commit's .deb, the same with the version bumped), built once per run
    (EVCP_PACKAGE_TEST_REUSE=1 takes those of the last run, while working on the tests)."""
    if os.environ.get("EVCP_PACKAGE_TEST_REUSE") == "1":
        built = [next((WORK / v).glob("evcp_*.deb"), None) for v in ("v1", "v2")]
        if built[0] and built[1]:
            return built[0], built[1]
    env = {**os.environ, "DEB_DIR": str(WORK / "v1")}
    sh("make", "-C", REPO, "deb", f"DEB_DIR={WORK / 'v1'}", env=env)
    first = next((WORK / "v1").glob("evcp_*.deb"))
    version = first.name.split("_")[1]
    src = WORK / "v2" / "src"
    shutil.rmtree(WORK / "v2", ignore_errors=True)
    shutil.copytree(WORK / "v1" / "src", src, symlinks=True)
    sh("dh_clean", cwd=src)
    _bump(src, f"{version}+1")
    sh("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src,
       env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    return first, next((WORK / "v2").glob("evcp_*.deb"))


def ensure_pristine() -> Path | str:
    """A minimal bookworm root as a tarball, made once and kept in CACHE; or why not."""
    if not PRISTINE.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / "root.build"
        shutil.rmtree(tmp, ignore_errors=True)
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={ROOT_PACKAGES}", "bookworm",
             str(tmp), mirror()],
            capture_output=True, text=True, timeout=1500, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return f"debootstrap from {mirror()} failed: {done.stderr.strip()[-300:]}"
        sh("tar", "-C", tmp, "--numeric-owner", "-cf", f"{PRISTINE}.part", ".")
        os.replace(f"{PRISTINE}.part", PRISTINE)
        shutil.rmtree(tmp)
    return PRISTINE


def unpack_root(pristine: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    sh("tar", "-C", path, "--numeric-owner", "-xf", pristine)
    return path


@pytest.fixture(scope="module")
def pristine() -> Path:
    made = ensure_pristine()
    if isinstance(made, str):
        pytest.skip(made)
    return made


@pytest.fixture
def root(pristine: Path) -> Iterator[Path]:
    path = unpack_root(pristine, WORK / "root")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def inroot(
    root: Path, *cmd: str, check: bool = True, user: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``root``: chroot in a private mount namespace with /proc and /dev/pts."""
    run = " ".join(f"'{c}'" for c in cmd)
    if user:
        run = f"runuser -u {user} -- {run}"
    script = (
        f"mount -t proc proc {root}/proc && "
        f"mount -t devpts -o newinstance,ptmxmode=0666 devpts {root}/dev/pts && "
        f"mount --bind {root}/dev/pts/ptmx {root}/dev/ptmx && "
        f'exec chroot {root} /bin/sh -c "$0"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, run],
        capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} in the root: {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def install(root: Path, deb: Path) -> None:
    shutil.copy(deb, root / "tmp" / deb.name)
    inroot(root, "apt-get", "install", "-y", "-q", f"/tmp/{deb.name}")


def mode_owner(root: Path, path: str) -> str:
    return inroot(root, "stat", "-c", "%a %U:%G", path).stdout.strip()


def configure(root: Path) -> None:
    (root / "etc/evcp/evcp.toml").write_text(CONFIG)


def run_agent_until_state(root: Path) -> None:
    """Run the agent as the evcp user until it made its state file, then stop it (SIGTERM)."""
    (root / "run/evcp").mkdir(exist_ok=True)  # the unit's RuntimeDirectory=
    inroot(root, "chown", "evcp:evcp", "/run/evcp")
    script = (
        "evcp run --config /etc/evcp/evcp.toml & pid=$!; "
        "for i in $(seq 600); do [ -S /run/evcp/control.sock ] && break; sleep 0.1; done; "
        "evcp status --config /etc/evcp/evcp.toml >/dev/null; s=$?; kill $pid; wait $pid; exit $s"
    )
    inroot(root, "sh", "-c", script, user="evcp")


# ----------------------------------------------------------------------------------- tests


def test_install_upgrade_remove_purge(root: Path, debs: tuple[Path, Path]) -> None:
    first, second = debs
    if shutil.which("lintian"):
        # No error of ours: what dh-virtualenv implies is overridden, with the reason.
        found = sh("lintian", "--fail-on", "error", first, check=False, timeout=600)
        assert not [line for line in found.splitlines() if line.startswith("E:")], found
    install(root, first)
    version = first.name.split("_")[1]
    assert inroot(root, "evcp", "--version").stdout.strip() == f"evcp {version}"
    # What the package owns: the config as a conffile, the command as a link, the man page.
    assert (
        "/etc/evcp/evcp.toml" in inroot(root, "dpkg-query", "-W", "-f=${Conffiles}", "evcp").stdout
    )
    assert "evcp: /usr/bin/evcp" in inroot(root, "dpkg", "-S", "/usr/bin/evcp").stdout
    assert (root / "usr/share/man/man1/evcp.1.gz").exists()
    assert (root / "usr/share/doc/evcp/README.md").exists()  # the unit's Documentation=
    assert mode_owner(root, "/etc/evcp/evcp.toml") == "640 root:evcp"
    assert mode_owner(root, "/var/lib/evcp") == "750 evcp:evcp"
    # The venv: no pip, no OCPP 2.x schemas, on exactly the Python the package depends on.
    venv = root / "opt/venvs/evcp"
    assert not list(venv.glob("lib/python3*/site-packages/pip"))
    assert not list(venv.glob("lib/python3*/site-packages/ocpp/v201/schemas"))
    assert not list(venv.glob("lib/python3*/site-packages/ocpp/v21/schemas"))
    assert list(venv.glob("lib/python3*/site-packages/ocpp/v16/schemas/*.json"))
    executable_data = [
        p for p in (venv / "lib").rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o111
        and ".so" not in p.name
    ]  # fmt: skip
    assert executable_data == []
    depends = inroot(root, "dpkg-query", "-W", "-f=${Depends}", "evcp").stdout
    target = os.readlink(venv / "bin" / "python3.11")
    assert target == "/usr/bin/python3.11" and re.search(r"\bpython3\.11\b", depends)
    # The shipped placeholders are refused in one line; nobody else reads the password.
    refused = inroot(root, "evcp", "check-config", check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "charge_point_id, password: still the shipped example" in refused.stderr
    assert inroot(root, "cat", "/etc/evcp/evcp.toml", user="nobody", check=False).returncode != 0

    configure(root)
    assert inroot(root, "evcp", "check-config").returncode == 0
    selftest = inroot(root, "evcp", "selftest", "--offline", "--json", check=False)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert '"passed": true' in selftest.stdout

    run_agent_until_state(root)
    assert mode_owner(root, "/var/lib/evcp/evcp.db") == "640 evcp:evcp"
    db_before = (root / "var/lib/evcp/evcp.db").read_bytes()
    unreadable = inroot(root, "cat", "/var/lib/evcp/evcp.db", user="nobody", check=False)
    assert unreadable.returncode != 0

    # Upgrade: the edited config and the state are kept; the new version runs.
    install(root, second)
    assert inroot(root, "evcp", "--version").stdout.strip() == f"evcp {version}+1"
    assert (root / "etc/evcp/evcp.toml").read_text() == CONFIG
    assert (root / "var/lib/evcp/evcp.db").read_bytes() == db_before
    assert mode_owner(root, "/etc/evcp/evcp.toml") == "640 root:evcp"

    # remove keeps config, state and user; purge leaves nothing.
    inroot(root, "apt-get", "remove", "-y", "-q", "evcp")
    assert (root / "etc/evcp/evcp.toml").exists() and (root / "var/lib/evcp/evcp.db").exists()
    assert not (root / "usr/bin/evcp").exists() and not (root / "opt/venvs/evcp/bin").exists()
    assert inroot(root, "getent", "passwd", "evcp", check=False).returncode == 0
    inroot(root, "apt-get", "purge", "-y", "-q", "evcp")
    for path in ("etc/evcp", "var/lib/evcp", "run/evcp", "opt/venvs/evcp", "usr/bin/evcp"):
        assert not (root / path).exists(), path
    assert inroot(root, "getent", "passwd", "evcp", check=False).returncode != 0
    assert inroot(root, "getent", "group", "evcp", check=False).returncode != 0
    assert "/etc/evcp" not in inroot(root, "dpkg-statoverride", "--list").stdout


# ------------------------------------------------------------------------ under systemd


class Booted:
    """A root booted by systemd-nspawn; commands run in it through nsenter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            # nspawn withholds CAP_SYS_TIME from a container by default: granted here so the
            # unit's AmbientCapabilities= can be seen. Nothing steps the clock: the test
            # config has no NTP servers.
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
             "--capability=CAP_SYS_TIME", "-D", str(root), "--boot"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.leader = 0

    def wait_booted(self, timeout: float = 120) -> str | None:
        """None once the container's systemd answers; else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                return f"systemd-nspawn exited {self.proc.returncode}: {out.strip()[-400:]}"
            children = sh("ps", "-o", "pid=", "--ppid", str(self.proc.pid), check=False).split()
            if children:
                self.leader = int(children[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return None
            time.sleep(0.5)
        return "the booted root's systemd did not come up"

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{cmd}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def prop(self, name: str) -> str:
        return self.run("systemctl", "show", "-P", name, "evcp").stdout.strip()

    def wait(self, what: str, predicate: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.2)
        journal = self.run("journalctl", "-u", "evcp", "--no-pager", "-n", "30", check=False)
        raise AssertionError(f"timed out waiting for {what}\n{journal.stdout}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # nspawn: power off the container
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def test_the_service_under_systemd(root: Path, debs: tuple[Path, Path]) -> None:
    if shutil.which("systemd-nspawn") is None or shutil.which("nsenter") is None:
        pytest.skip("systemd-nspawn not installed (apt-get install systemd-container)")
    install(root, debs[0])
    booted = Booted(root)
    try:
        why = booted.wait_booted()
        if why is not None:
            pytest.skip(f"systemd-nspawn cannot boot a root on this machine: {why}")
        # The placeholder config: one clear line, exit 2, no restart loop.
        booted.run("systemctl", "start", "evcp", check=False)
        booted.wait("the placeholder refusal", lambda: booted.prop("ExecMainStatus") == "2")
        assert booted.prop("ActiveState") == "failed"
        assert booted.prop("NRestarts") == "0"
        log = booted.run("journalctl", "-u", "evcp", "--no-pager", "-o", "cat").stdout
        assert "still the shipped example" in log
        # A real config: READY (Type=notify), then a hang (SIGSTOP) ends in a watchdog restart.
        configure(root)
        booted.run("mkdir", "-p", "/etc/systemd/system/evcp.service.d")
        (root / "etc/systemd/system/evcp.service.d/watchdog.conf").write_text(
            "[Service]\nWatchdogSec=5\nRestartSec=1\n"
        )
        booted.run("systemctl", "daemon-reload")
        booted.run("systemctl", "reset-failed", "evcp")
        booted.run("systemctl", "start", "evcp")  # returns once READY=1 arrived
        assert booted.prop("ActiveState") == "active" and booted.prop("SubState") == "running"

        # The simulated controller and meter answer over ptys and a TCP port on loopback:
        # serial access under DevicePolicy=closed + DeviceAllow=char-pts (the status of an
        # agent whose controller is silent is Faulted).
        def connector() -> dict[str, object]:
            status = booted.run("evcp", "status", "--json", check=False)
            if status.returncode != 0:
                return {}
            return dict(json.loads(status.stdout)["connectors"][0])

        booted.wait("the connector Available", lambda: connector().get("status") == "Available")
        assert connector()["error_code"] == "NoError"
        assert booted.run("stat", "-c", "%a", "/var/lib/evcp").stdout.strip() == "750"
        assert booted.run("stat", "-c", "%a", "/var/lib/evcp/evcp.db").stdout.strip() == "640"
        pid = booted.prop("MainPID")
        # Stepping the clock needs CAP_SYS_TIME (kept, the only one) -- not exercised here:
        # it would step this machine's clock, which the container shares.
        caps = booted.run("grep", "^CapEff:", f"/proc/{pid}/status").stdout.split()[1]
        assert int(caps, 16) == 1 << 25, caps  # CAP_SYS_TIME alone
        booted.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "evcp")
        booted.wait("a watchdog restart", lambda: booted.prop("NRestarts") == "1"
                    and booted.prop("SubState") == "running")  # fmt: skip
        assert booted.prop("MainPID") != pid
        log = booted.run("journalctl", "-u", "evcp", "--no-pager").stdout
        assert "Watchdog timeout" in log or "watchdog" in log.lower()
        exposure = booted.run("systemd-analyze", "security", "evcp", check=False).stdout
        match = re.search(r"Overall exposure level for evcp.service: ([\d.]+)", exposure)
        assert match and float(match.group(1)) <= 2.3, exposure[-400:]
    finally:
        booted.stop()


# ------------------------------------------------------------- firmware install, for real


def _broken(deb: Path, version: str, work: Path) -> Path:
    """``deb`` repacked as ``version`` with an agent that exits 1 at once: a package that
    installs fine and whose service never comes up."""
    tree = work / "broken"
    shutil.rmtree(tree, ignore_errors=True)
    sh("dpkg-deb", "-R", deb, tree)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    agent = tree / "opt/venvs/evcp/bin/evcp"
    agent.write_text(
        "#!/bin/sh\necho 'evcp: deliberately broken for the package test' >&2\nexit 1\n"
    )
    out = work / f"evcp_{version}_broken.deb"
    sh("dpkg-deb", "--root-owner-group", "-b", tree, out)
    return out


def test_firmware_update_installed_and_a_broken_one_rolled_back(
    root: Path, debs: tuple[Path, Path]
) -> None:
    """UpdateFirmware end to end on the booted root: the CSMS (inside the root's own network
    namespace) asks, the agent downloads over HTTPS and hands over, the real path unit starts
    the real installer, dpkg installs the rebuilt package with the bumped version, the new
    version boots and the CSMS sees Installed. Then a package whose service never starts:
    the installer sees the crash loop, reinstalls the previous package, and the CSMS sees
    InstallationFailed from it."""
    if shutil.which("systemd-nspawn") is None or shutil.which("nsenter") is None:
        pytest.skip("systemd-nspawn not installed (apt-get install systemd-container)")
    import trustme  # the test CSMS's certificate, as in the end-to-end tests

    first, second = debs
    v1, v2 = first.name.split("_")[1], second.name.split("_")[1]
    broken = _broken(second, f"{v2}+broken", WORK)
    install(root, first)
    # As apt leaves a package it downloaded: the installer's copy of the installed version.
    shutil.copy(first, root / "var/cache/apt/archives" / first.name)
    srv = root / "srv/csms"
    (srv / "files").mkdir(parents=True)
    shutil.copy(second, srv / "files" / second.name)
    shutil.copy(broken, srv / "files" / broken.name)
    shutil.copy(Path(__file__).with_name("csms_in_root.py"), srv / "csms_in_root.py")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(srv / "server.pem"))
    ca.cert_pem.write_to_path(str(root / "etc/evcp/test-ca.pem"))
    port, file_port, cp_id, password = "9443", "9444", "CP-PKG-1", "package-test-password-1"
    (root / "etc/evcp/evcp.toml").write_text(
        CONFIG.replace("wss://csms.invalid/ocpp", f"wss://127.0.0.1:{port}/ocpp").replace(
            'password = "package-test-password-1"',
            'password = "package-test-password-1"\nca_file = "/etc/evcp/test-ca.pem"',
        )
        + '\n[firmware]\nca_file = "/etc/evcp/test-ca.pem"\nrollback_after_s = 120\n'
    )
    booted = Booted(root)
    try:
        why = booted.wait_booted()
        if why is not None:
            pytest.skip(f"systemd-nspawn cannot boot a root on this machine: {why}")
        # The installer's units as the package leaves them; the spool the two share.
        assert booted.run("systemctl", "is-enabled", "evcp-installer.path").stdout.strip() == (
            "enabled"
        )
        assert booted.run("systemctl", "is-active", "evcp-installer.path").stdout.strip() == (
            "active"
        )
        assert mode_owner(root, "/var/lib/evcp/firmware") == "750 evcp:evcp"
        # The CSMS runs from a copy of the venv: dpkg replaces the package's own under it.
        booted.run("cp", "-a", "/opt/venvs/evcp", "/srv/csms/venv")
        booted.run(
            "systemd-run", "--unit=test-csms", "/srv/csms/venv/bin/python3.11",
            "/srv/csms/csms_in_root.py", "/srv/csms", port, file_port, cp_id, password,
        )  # fmt: skip
        booted.run("systemctl", "start", "evcp")

        def received() -> list[tuple[str, dict[str, object]]]:
            with contextlib.suppress(OSError, ValueError):
                return [(a, p) for a, p in json.loads((srv / "received.json").read_text())]
            return []

        def firmware() -> list[object]:
            return [p["status"] for a, p in received() if a == "FirmwareStatusNotification"]

        def boots() -> list[object]:
            return [p["firmwareVersion"] for a, p in received() if a == "BootNotification"]

        def wait(what: str, predicate: object, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if predicate():  # type: ignore[operator]
                    return
                time.sleep(0.5)
            logs = booted.run("journalctl", "--no-pager", "-n", "60", "-u", "evcp",
                              "-u", "evcp-installer", "-u", "test-csms", check=False)  # fmt: skip
            raise AssertionError(f"timed out waiting for {what}: {received()}\n{logs.stdout}")

        wait("the first BootNotification", lambda: boots() == [v1], 120)

        # The update: downloaded, handed over, installed by dpkg, the new version boots.
        location = f"https://127.0.0.1:{file_port}/{second.name}"
        (srv / "command.json").write_text(json.dumps({"location": location}))
        wait("Installed", lambda: "Installed" in firmware(), 400)
        assert firmware() == ["Downloading", "Downloaded", "Installing", "Installed"]
        assert boots()[-1] == v2
        assert inroot(root, "dpkg-query", "-W", "-f=${Version}", "evcp").stdout == v2
        # The new version reports Installed itself at its boot; the installer, seeing the
        # same proof, then keeps the package as the one to roll back to next time.
        kept = root / "var/lib/evcp-installer/current.deb"
        wait("the installer to keep the package", kept.exists, 60)
        assert kept.read_bytes() == second.read_bytes()

        # A package whose service never starts: rolled back to v2, reported by v2.
        mark = len(firmware())
        location = f"https://127.0.0.1:{file_port}/{broken.name}"
        (srv / "command.json").write_text(json.dumps({"location": location}))
        wait("InstallationFailed", lambda: "InstallationFailed" in firmware()[mark:], 600)
        assert firmware()[mark:] == [
            "Downloading", "Downloaded", "Installing", "InstallationFailed",
        ]  # fmt: skip
        assert inroot(root, "dpkg-query", "-W", "-f=${Version}", "evcp").stdout == v2
        assert boots()[-1] == v2
        assert booted.run("systemctl", "is-active", "evcp").stdout.strip() == "active"
        log = booted.run("journalctl", "--no-pager", "-u", "evcp-installer", "-o", "cat").stdout
        assert "crash loop" in log or "failed" in log
    finally:
        booted.stop()
