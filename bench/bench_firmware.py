"""Firmware Management figures (prints, never asserts).

1. RSS of the agent-side process (this one, running the real FirmwareService, as the agent
   would) before, during (peak of samples every 50 ms) and after a 20 MB download over
   HTTPS on loopback (trustme CA) through the transfer helper process; plus the helper's
   own peak RSS (``ru_maxrss`` of children). The target: the agent's RSS does not move.
2. Time from UpdateFirmware to Downloaded and to Installing (the installer hand-over) for
   that local 20 MB update, and the installer's run (verify with the real dpkg-deb, install
   with a fake dpkg, restart, health proof) on a small real .deb. The fakes are the ones of
   tests/agent/features/firmware/test_installer.py (no package may be installed here).
3. GetDiagnostics bundle size and build time for a week of logs: a synthesized journal
   (``--lines-per-day`` lines of agent-like text per day for 7 days) served by a stand-in
   ``journalctl`` (this machine's journal has no evcp unit), compressed by the helper.

Usage: python bench/bench_firmware.py [--mb 20] [--lines-per-day 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from agent.features.firmware.service import FirmwareService, Settings  # noqa: E402
from tests.agent.features.firmware.servers import FileServer  # noqa: E402
from tests.agent.features.firmware.test_installer import INSTALLER, Rig, build_deb  # noqa: E402
from tests.agent.features.firmware.test_service import Port  # noqa: E402
from tests.conftest import server_context  # noqa: E402


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def serve(directory: Path, mb: int) -> None:
    """The file server, in its own process so that its 20 MB are not counted in ours."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    with FileServer(server_context(ca)) as server:
        server.state.files["/evcp.deb"] = os.urandom(mb * 1024 * 1024)
        (directory / "url").write_text(server.url("/evcp.deb"))
        sys.stdin.read()  # until the parent closes our stdin


async def download_figures(tmp: Path, mb: int, url: str) -> None:
    settings = Settings(
        spool_dir=tmp / "spool",
        config_path=tmp / "none.toml",
        state_db=tmp / "none.db",
        charge_point_id="CP-BENCH",
        ca_file=str(tmp / "ca.pem"),
    )
    port = Port()
    svc = FirmwareService(port, settings)
    await svc.start()
    svc.on_boot_accepted()
    await asyncio.sleep(0.5)
    before = rss_kib()
    samples: list[int] = []
    helper_peak = 0
    t0 = time.monotonic()
    svc.update_firmware(url, 0)
    t_downloaded = t_installing = None
    while t_installing is None:
        samples.append(rss_kib())
        for process in list(svc._processes):
            try:
                helper_peak = max(helper_peak, hwm_kib(process.pid))
            except OSError:
                pass
        if t_downloaded is None and "Downloaded" in port.firmware():
            t_downloaded = time.monotonic() - t0
        if "Installing" in port.firmware():
            t_installing = time.monotonic() - t0
        if "DownloadFailed" in port.firmware():
            raise SystemExit("download failed")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    after = rss_kib()
    await svc.stop()
    print(f"{mb} MB update over HTTPS (loopback), through the helper process:")
    print(f"  agent-side RSS before {before / 1024:.2f} MiB, during (peak) "
      f"{max(samples) / 1024:.2f} MiB, after {after / 1024:.2f} MiB")  # fmt: skip
    print(f"  helper process peak RSS (VmHWM) {helper_peak / 1024:.1f} MiB (gone when it exits)")
    print(f"  UpdateFirmware -> Downloaded {t_downloaded:.2f} s, -> Installing (hand-over)"
      f" {t_installing:.2f} s")  # fmt: skip


def installer_figures(tmp: Path) -> None:
    rig = Rig(tmp / "rig")
    build_deb(rig.work / "current.deb", "0.1.0")
    (rig.fake / "healthy").write_text("0.1.0 0.2.0")
    rig.request(build_deb(rig.tmp / "new.deb", "0.2.0"))
    env = {**os.environ, "PATH": f"{rig.bin}:{os.environ['PATH']}", "FAKE": str(rig.fake),
           "SPOOL": str(rig.spool), "EVCP_APT_ARCHIVES": str(rig.archives)}  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, str(INSTALLER), "--config", str(rig.config), "--work-dir",
         str(rig.work), "--poll-s", "0.05"], env=env, check=True, capture_output=True,
    )  # fmt: skip
    took = time.monotonic() - t0
    result = json.loads((rig.spool / "install.result").read_text())
    print(f"installer (real dpkg-deb checks, fake dpkg/systemctl): {result['status']} in"
          f" {took:.2f} s (on a charger add dpkg's own time and the agent's start)")  # fmt: skip


LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARNING")
MESSAGES = (
    "ocpp: sent MeterValues connector 1 ({n} Wh)",
    "ocpp: received Heartbeat.conf currentTime 2026-12-0{d}T10:00:{s:02d}Z",
    "meter: read 12 registers in {ms} ms",
    "connector 1: Charging -> SuspendedEV",
    "uplink: ping csms.example.com {ms} ms",
)


def bundle_figures(tmp: Path, lines_per_day: int) -> None:
    journal = tmp / "week.log"
    rng = random.Random(1)
    start = time.time() - 7 * 86400
    step = 86400 / lines_per_day
    with open(journal, "w") as f:
        for i in range(7 * lines_per_day):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(start + i * step))
            text = rng.choice(MESSAGES).format(
                n=i * 7, d=1 + i % 7, s=i % 60, ms=rng.randint(3, 900)
            )
            f.write(f"{stamp} charger evcp[812]: {rng.choice(LEVELS)} {text}\n")
    fake = tmp / "journalctl"
    fake.write_text(f"#!/bin/sh\nexec cat {journal}\n")
    fake.chmod(0o755)
    config = tmp / "evcp.toml"
    config.write_text('[csms]\npassword = "0123456789abcdef-secret"\n')
    db = tmp / "evcp.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x)")
    status = tmp / "status.json"
    status.write_text(json.dumps({"queue": {"pending": 0}}))
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agent.features.firmware.transfer", "bundle", "--out",
         str(tmp / "diag.tar.gz"), "--config", str(config), "--state-db", str(db),
         "--status-json", str(status), "--since", str(start), "--journalctl", str(fake)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    took = time.monotonic() - t0
    result: dict[str, Any] = json.loads(done.stdout)
    print(f"GetDiagnostics bundle, a week of logs ({7 * lines_per_day} lines,"
          f" {journal.stat().st_size / 1e6:.1f} MB of text): {result['bytes'] / 1e6:.2f} MB"
          f" tar.gz in {took:.2f} s (helper process)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--lines-per-day", type=int, default=20_000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.mb)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = subprocess.Popen(
            [sys.executable, "-W", "ignore", __file__, "--serve", str(tmp), "--mb", str(args.mb)],
            stdin=subprocess.PIPE,
        )
        try:
            while not (tmp / "url").exists():
                time.sleep(0.05)
            asyncio.run(download_figures(tmp, args.mb, (tmp / "url").read_text()))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(30)
        installer_figures(tmp)
        bundle_figures(tmp, args.lines_per_day)


if __name__ == "__main__":
    main()
