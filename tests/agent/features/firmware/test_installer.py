"""packaging/evcp-installer: verify, keep the previous package, install, wait for the health
proof, roll back.

FAKES, and why: installing packages and restarting units on this host is not allowed, and no
booted bookworm root is available to this suite. So ``dpkg`` (install and
--print-architecture), ``dpkg-query`` and ``systemctl`` are test-made scripts put first on
PATH that record every call; ``systemctl restart`` runs a hook standing for "the installed
version boots": a healthy version writes the boot-accepted marker as the agent does at
BootNotification Accepted, a broken one never does (or crash-loops). The packages themselves
are REAL .deb files built with ``dpkg-deb --build`` and checked by the real ``dpkg-deb -f``.
The install in a debootstrap'd root or systemd-nspawn belongs to the packaging tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
INSTALLER = ROOT / "packaging" / "evcp-installer"
ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
).stdout.strip()

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not ARCH, reason="needs dpkg-deb to build real .debs"
)


def build_deb(out: Path, version: str, package: str = "evcp", arch: str = "all") -> Path:
    src = out.parent / f"src-{package}-{version}-{arch}"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
        "Maintainer: test <t@example.com>\nDescription: test package\n"
    )
    (src / "usr" / "share" / "evcp").mkdir(parents=True)
    (src / "usr" / "share" / "evcp" / "VERSION").write_text(version)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(src), str(out)],
        check=True,
        capture_output=True,
    )
    return out


HOOK = r"""#!{python}
# "The installed version boots": healthy versions reach BootNotification Accepted.
import json, os, time
fake = os.environ["FAKE"]
version = open(f"{{fake}}/installed").read().strip()
spool = os.environ["SPOOL"]
with open(f"{{fake}}/boots", "a") as f:
    result = os.path.exists(f"{{spool}}/install.result")
    f.write(json.dumps({{"version": version, "result_present": result}}) + "\n")
healthy = open(f"{{fake}}/healthy").read().split()
crash = open(f"{{fake}}/crashing").read().split() if os.path.exists(f"{{fake}}/crashing") else []
if version in crash:
    open(f"{{fake}}/nrestarts", "w").write("7")
elif version in healthy or "any" in healthy:
    with open(f"{{spool}}/boot-accepted", "w") as f:
        json.dump({{"version": version, "at": time.time()}}, f)
"""


class Rig:
    def __init__(self, tmp: Path, *, installed: str = "0.1.0") -> None:
        self.tmp = tmp
        self.fake = tmp / "fake"
        self.bin = tmp / "bin"
        self.spool = tmp / "state" / "firmware"
        self.work = tmp / "installer"
        self.archives = tmp / "archives"
        for d in (self.fake, self.bin, self.spool, self.work, self.archives):
            d.mkdir(parents=True)
        if installed:
            (self.fake / "installed").write_text(installed)
        (self.fake / "healthy").write_text("")
        self.config = tmp / "evcp.toml"
        self.set_config()
        self._script(
            "dpkg",
            f"""#!/bin/sh
echo "dpkg $*" >> "$FAKE/calls"
case "$1" in
  --print-architecture) echo {ARCH} ;;
  -i) v=$(dpkg-deb -f "$2" Version) || exit 2
      if grep -qx "$v" "$FAKE/dpkg-fails" 2>/dev/null; then echo "dpkg: error" >&2; exit 1; fi
      echo "$v" > "$FAKE/installed" ;;
esac
""",
        )
        self._script(
            "dpkg-query",
            '#!/bin/sh\necho "dpkg-query $*" >> "$FAKE/calls"\ncat "$FAKE/installed" 2>/dev/null\n',
        )
        self._script(
            "systemctl",
            """#!/bin/sh
echo "systemctl $*" >> "$FAKE/calls"
case "$1" in
  restart) "$FAKE/on-restart" ;;
  show) cat "$FAKE/nrestarts" 2>/dev/null || echo 0 ;;
  is-failed) exit 1 ;;
esac
""",
        )
        hook = self.fake / "on-restart"
        hook.write_text(HOOK.format(python=sys.executable))
        hook.chmod(0o755)

    def _script(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def set_config(self, rollback_after_s: float = 20, install_command: str = "") -> None:
        self.config.write_text(
            f'[agent]\nstate_dir = "{self.tmp / "state"}"\n'
            f"[firmware]\nrollback_after_s = {rollback_after_s}\n"
            f"install_command = {json.dumps(install_command)}\n"
        )

    def request(self, deb: Path) -> None:
        shutil.copyfile(deb, self.spool / "firmware.download")
        (self.spool / "install.request").write_text(
            json.dumps({"file": "firmware.download", "from_version": "0.1.0"})
        )

    def run(self) -> dict[str, object]:
        env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE": str(self.fake),
            "SPOOL": str(self.spool),
            "EVCP_APT_ARCHIVES": str(self.archives),
        }
        done = subprocess.run(
            [sys.executable, str(INSTALLER), "--config", str(self.config),
             "--work-dir", str(self.work), "--poll-s", "0.05"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not (self.spool / "install.request").exists()  # the path unit will not refire
        return dict(json.loads((self.spool / "install.result").read_text()))

    def calls(self) -> list[str]:
        path = self.fake / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def installs(self) -> list[str]:
        return [c for c in self.calls() if c.startswith("dpkg -i ")]

    def installed(self) -> str:
        return (self.fake / "installed").read_text().strip()

    def boots(self) -> list[dict[str, object]]:
        path = self.fake / "boots"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    build_deb(r.work / "current.deb", "0.1.0")  # kept by the previous install
    return r


def test_a_healthy_update_is_installed_and_kept_for_next_time(rig: Rig) -> None:
    (rig.fake / "healthy").write_text("0.1.0 0.2.0")
    rig.request(build_deb(rig.tmp / "new.deb", "0.2.0", arch=ARCH))
    result = rig.run()
    assert result["status"] == "Installed" and result["version"] == "0.2.0"
    assert rig.installed() == "0.2.0"
    assert rig.installs() == [f"dpkg -i {rig.work / 'incoming.deb'}"]
    assert "systemctl restart evcp.service" in rig.calls()
    # the new package is the one to roll back to next time
    assert subprocess.run(["dpkg-deb", "-f", str(rig.work / "current.deb"), "Version"],
                          capture_output=True, text=True, check=True).stdout.strip() == "0.2.0"  # fmt: skip


def test_a_version_that_never_reaches_the_csms_is_rolled_back(rig: Rig) -> None:
    (rig.fake / "healthy").write_text("0.1.0")  # 0.3.0 starts but is never Accepted
    rig.set_config(rollback_after_s=1)
    rig.request(build_deb(rig.tmp / "broken.deb", "0.3.0"))
    result = rig.run()
    assert result["status"] == "InstallationFailed"
    assert "rolled back to 0.1.0" in str(result["reason"])
    assert "no BootNotification Accepted" in str(result["reason"])
    assert rig.installed() == "0.1.0"
    assert rig.installs() == [
        f"dpkg -i {rig.work / 'incoming.deb'}",
        f"dpkg -i {rig.work / 'previous.deb'}",
    ]
    boots = rig.boots()
    assert [b["version"] for b in boots] == ["0.3.0", "0.1.0"]
    # the old version starts with the result already there, to report InstallationFailed
    assert boots[1]["result_present"] is True


def test_a_crash_loop_is_rolled_back_without_waiting_for_the_deadline(rig: Rig) -> None:
    (rig.fake / "healthy").write_text("0.1.0")
    (rig.fake / "crashing").write_text("0.3.0")
    rig.set_config(rollback_after_s=3600)  # the test would time out if it waited for this
    rig.request(build_deb(rig.tmp / "broken.deb", "0.3.0"))
    result = rig.run()
    assert result["status"] == "InstallationFailed"
    assert "crash loop" in str(result["reason"])
    assert rig.installed() == "0.1.0"


@pytest.mark.parametrize(
    ("package", "arch", "reason"),
    [
        ("not-evcp", "all", "not 'evcp'"),
        ("evcp", "mips64el" if ARCH != "mips64el" else "armhf", "this machine is"),
    ],
    ids=["other-package", "other-architecture"],
)
def test_a_wrong_package_is_refused_and_nothing_is_installed(
    rig: Rig, package: str, arch: str, reason: str
) -> None:
    rig.request(build_deb(rig.tmp / "x.deb", "9.9", package=package, arch=arch))
    result = rig.run()
    assert result["status"] == "InstallationFailed" and reason in str(result["reason"])
    assert rig.installs() == []
    assert "systemctl restart evcp.service" not in rig.calls()
    assert rig.installed() == "0.1.0"


def test_garbage_is_refused(rig: Rig) -> None:
    garbage = rig.tmp / "garbage.deb"
    garbage.write_bytes(os.urandom(4096))
    rig.request(garbage)
    result = rig.run()
    assert "not a Debian package" in str(result["reason"])
    assert rig.installs() == []


def test_no_copy_of_the_installed_version_means_no_install(tmp_path: Path) -> None:
    rig = Rig(tmp_path)  # no current.deb, nothing in apt's cache
    rig.request(build_deb(rig.tmp / "new.deb", "0.2.0"))
    result = rig.run()
    assert "nothing to roll back to" in str(result["reason"]) or "no copy" in str(result["reason"])
    assert rig.installs() == []


def test_the_previous_package_can_come_from_apts_cache(tmp_path: Path) -> None:
    rig = Rig(tmp_path, installed="1:0.1.0")
    build_deb(rig.archives / f"evcp_1%3a0.1.0_{ARCH}.deb", "1:0.1.0", arch=ARCH)
    (rig.fake / "healthy").write_text("")
    rig.set_config(rollback_after_s=1)
    rig.request(build_deb(rig.tmp / "new.deb", "1:0.2.0"))
    result = rig.run()
    assert result["status"] == "InstallationFailed"
    assert rig.installed() == "1:0.1.0"  # rolled back with the cached package


def test_dpkg_failing_reinstalls_the_previous_package(rig: Rig) -> None:
    (rig.fake / "healthy").write_text("0.1.0")
    (rig.fake / "dpkg-fails").write_text("0.2.0\n")
    rig.request(build_deb(rig.tmp / "new.deb", "0.2.0"))
    result = rig.run()
    assert result["status"] == "InstallationFailed" and "dpkg" in str(result["reason"])
    assert rig.installs()[-1] == f"dpkg -i {rig.work / 'previous.deb'}"
    assert rig.installed() == "0.1.0"


def test_install_command_replaces_dpkg(rig: Rig) -> None:
    image = rig.tmp / "slot-b.img"
    rig.set_config(install_command=f"cp {{file}} {image}")
    (rig.fake / "healthy").write_text("any")
    payload = os.urandom(1000)
    update = rig.tmp / "update.raucb"
    update.write_bytes(payload)
    rig.request(update)
    result = rig.run()
    assert result["status"] == "Installed"
    assert image.read_bytes() == payload
    assert rig.installs() == []  # no dpkg, no package checks
    assert "systemctl restart evcp.service" in rig.calls()


def test_a_symlinked_update_is_refused(rig: Rig) -> None:
    (rig.spool / "firmware.download").symlink_to("/etc/shadow")
    (rig.spool / "install.request").write_text(json.dumps({"file": "firmware.download"}))
    result = rig.run()
    assert result["status"] == "InstallationFailed" and "cannot open" in str(result["reason"])
    assert rig.installs() == []


@pytest.mark.parametrize("name", ["../../etc/passwd", ".hidden", ""])
def test_a_request_outside_the_spool_is_refused(rig: Rig, name: str) -> None:
    (rig.spool / "install.request").write_text(json.dumps({"file": name}))
    result = rig.run()
    assert "bad file name" in str(result["reason"])


# --- the agent and the installer together: the files between them are the whole contract


async def _agent_and_installer(rig: Rig, ca_file: Path, ca: object, new_version: str, *,
                               healthy: bool) -> tuple[list[str], dict[str, object]]:  # fmt: skip
    import asyncio

    from agent.features.firmware.service import FirmwareService, Settings
    from tests.agent.features.firmware.servers import FileServer
    from tests.agent.features.firmware.test_service import Port, until
    from tests.conftest import server_context

    settings = Settings(
        spool_dir=rig.spool,
        config_path=rig.config,
        state_db=rig.tmp / "none.db",
        charge_point_id="CP-1",
        ca_file=str(ca_file),
    )
    deb = build_deb(rig.tmp / "served.deb", new_version)
    with FileServer(server_context(ca)) as server:  # type: ignore[arg-type]
        server.state.files["/evcp.deb"] = deb.read_bytes()
        old = Port("0.1.0")
        svc = FirmwareService(old, settings)
        await svc.start()
        svc.on_boot_accepted()
        svc.update_firmware(server.url("/evcp.deb"), 0)
        await until(lambda: (rig.spool / "install.request").exists(), "the hand-over")
        await svc.stop()
    env = {**os.environ, "PATH": f"{rig.bin}:{os.environ['PATH']}", "FAKE": str(rig.fake),
           "SPOOL": str(rig.spool), "EVCP_APT_ARCHIVES": str(rig.archives)}  # fmt: skip
    # what evcp-installer.path does when the request appears
    installer = await asyncio.create_subprocess_exec(
        sys.executable, str(INSTALLER), "--config", str(rig.config),
        "--work-dir", str(rig.work), "--poll-s", "0.05", env=env,
    )  # fmt: skip
    try:
        # the restart: whatever version is installed now starts and reaches the CSMS
        await until(lambda: len(rig.boots()) >= 1, "the restart")
        booted = Port(rig.installed())
        if healthy or booted.version == "0.1.0":
            svc = FirmwareService(booted, settings)
            await svc.start()
            svc.on_boot_accepted()
        if not healthy:
            await until(lambda: len(rig.boots()) >= 2, "the rollback restart")
            booted = Port(rig.installed())
            svc = FirmwareService(booted, settings)
            await svc.start()
            svc.on_boot_accepted()
        await until(lambda: bool(booted.firmware()), "the final status")
        assert await asyncio.wait_for(installer.wait(), 60) == 0
        await svc.stop()
    finally:
        if installer.returncode is None:
            installer.kill()
            await installer.wait()
    result = json.loads((rig.spool / "install.result").read_text()) if (
        rig.spool / "install.result").exists() else {}  # fmt: skip
    return [*old.firmware(), "|", booted.version, *booted.firmware()], result


async def test_agent_and_installer_update_end_to_end(rig: Rig, ca_file: Path, ca: object) -> None:
    statuses, _ = await _agent_and_installer(rig, ca_file, ca, "0.2.0", healthy=True)
    assert statuses == ["Downloading", "Downloaded", "Installing", "|", "0.2.0", "Installed"]
    assert rig.installed() == "0.2.0"


async def test_agent_and_installer_broken_package_end_to_end(
    rig: Rig, ca_file: Path, ca: object
) -> None:
    rig.set_config(rollback_after_s=1)
    statuses, _ = await _agent_and_installer(rig, ca_file, ca, "0.3.0", healthy=False)
    # 0.3.0 never reaches the CSMS; 0.1.0 is back and says so
    assert statuses == [
        "Downloading", "Downloaded", "Installing", "|", "0.1.0", "InstallationFailed",
    ]  # fmt: skip
    assert rig.installed() == "0.1.0"
