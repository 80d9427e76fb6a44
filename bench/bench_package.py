"""Figures for the Debian package: its size, installed size, the time from `apt-get install`
to READY on a booted bookworm root (systemd-nspawn), and `systemd-analyze security`.

    python bench/bench_package.py [--deb build/deb/evcp_X_amd64.deb]

Without --deb it runs `make deb`. Needs root, debootstrap and systemd-container; the root
is the package test's cached one (/var/cache/evcp-package-test).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.package.test_package import (  # noqa: E402
    CONFIG,
    WORK,
    Booted,
    ensure_pristine,
    sh,
    unpack_root,
)


def compare_builds() -> None:
    """Two builds of this tree in different directories: identical .deb files, or the
    files inside that differ (diffoscope, where installed, says how)."""
    debs = []
    for directory in ("build/deb", "build/deb-again"):
        started = time.monotonic()
        sh("make", "-C", REPO, "deb", f"DEB_DIR={directory}")
        print(f"build              {directory}: {time.monotonic() - started:.0f} s")
        debs.append(next((REPO / directory).glob("evcp_*.deb")))
    digests = [sh("sha256sum", deb).split()[0] for deb in debs]
    if digests[0] == digests[1]:
        print(f"reproducible       yes: both builds are {digests[0][:16]}...")
        return
    print("reproducible       NO: the files below differ")
    if shutil.which("diffoscope"):
        print(sh("diffoscope", "--text", "-", *debs, check=False)[-4000:])
        return
    trees = [WORK / "unpacked-a", WORK / "unpacked-b"]
    for deb, tree in zip(debs, trees, strict=True):
        shutil.rmtree(tree, ignore_errors=True)
        sh("dpkg-deb", "-R", deb, tree)
    print(sh("diff", "-rq", "--no-dereference", *trees, check=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="the package (default: make deb)")
    parser.add_argument(
        "--reproducible",
        action="store_true",
        help="build a second time (make deb DEB_DIR=build/deb-again) and compare",
    )
    args = parser.parse_args()
    if args.reproducible:
        compare_builds()
    deb = args.deb
    if deb is None:
        sh("make", "-C", REPO, "deb")
        deb = next((REPO / "build" / "deb").glob("evcp_*.deb"))
    installed_kib = int(sh("dpkg-deb", "-f", deb, "Installed-Size").strip())
    print(f"package            {deb.name}")
    print(f"package size       {deb.stat().st_size / 2**20:.2f} MiB")
    print(f"installed size     {installed_kib / 1024:.2f} MiB")
    pristine = ensure_pristine()
    if isinstance(pristine, str):
        print(f"install to READY   not measured: {pristine}")
        return 0
    root = unpack_root(pristine, WORK / "bench-root")
    # A valid config in place before the install (kept: --force-confold), so the service
    # the postinst starts comes up instead of refusing the placeholders.
    (root / "etc/evcp").mkdir(parents=True)
    (root / "etc/evcp/evcp.toml").write_text(CONFIG)
    shutil.copy(deb, root / "srv" / deb.name)  # (the booted root has a tmpfs on /tmp)
    booted = Booted(root)
    try:
        why = booted.wait_booted()
        if why is not None:
            print(f"install to READY   not measured: {why}")
            return 0
        start = time.monotonic()
        booted.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                   "-o", "Dpkg::Options::=--force-confold", f"/srv/{deb.name}")  # fmt: skip
        installed = time.monotonic()
        booted.wait("READY", lambda: booted.prop("SubState") == "running", timeout=300)
        ready = time.monotonic()
        print(f"apt-get install    {installed - start:.1f} s (unpack, user, postinst, start)")
        print(f"install to READY   {ready - start:.1f} s")
        security = booted.run("systemd-analyze", "security", "evcp", check=False).stdout
        match = re.search(r"Overall exposure level for evcp.service: ([\d.]+ \w+)", security)
        print(f"exposure           {match.group(1) if match else 'unknown'}"
              " (systemd-analyze security)")  # fmt: skip
        rss = booted.run("systemctl", "show", "-P", "MemoryCurrent", "evcp").stdout.strip()
        if rss.isdigit():
            print(f"service memory     {int(rss) / 2**20:.1f} MiB (cgroup, just after READY)")
    finally:
        booted.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
