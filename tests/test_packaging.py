"""What the Debian package ships: the venv trimmed by packaging/slim-venv, and one unit."""

from __future__ import annotations

import importlib.util
import marshal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_slim_venv_compiles_byte_code_without_column_tables_or_docstrings(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "evcp_probe.py").write_text("def f(a, b):\n    return a.x + b.y\n")
    (site / "evcp_docs.py").write_text(
        '"""Module doc."""\n'
        "class C:\n"
        '    """Class doc."""\n'
        "def g(x):\n"
        '    """Function doc."""\n'
        "    assert x, 'asserts stay'\n"
        "    return x\n"
        "def h():\n"
        '    """Only a docstring."""\n'
    )
    (site / "evcp_uses_doc.py").write_text(
        '"""Kept: the module reads it."""\nDOC = __doc__\ndef f():\n    """Kept too."""\n'
    )
    (site / "distutils-precedence.pth").write_text("import os\n")  # as setuptools leaves it
    (site / "setuptools").mkdir()
    subprocess.run([str(ROOT / "packaging" / "slim-venv"), str(venv)], check=True)
    pyc = Path(importlib.util.cache_from_source(str(site / "evcp_probe.py")))
    code = marshal.loads(pyc.read_bytes()[16:])
    function = next(c for c in code.co_consts if hasattr(c, "co_positions"))
    positions = list(function.co_positions())
    assert positions and all(column is None for _, _, column, _ in positions)
    assert {line for line, *_ in positions if line} == {1, 2}  # line numbers stay
    # Docstrings are left out of the byte code, asserts and line numbers stay.
    probe = (
        "import evcp_docs as m, evcp_uses_doc as u, traceback\n"
        "print(m.__doc__, m.C.__doc__, m.g.__doc__, m.h.__doc__, m.h(), u.DOC, u.f.__doc__)\n"
        "try:\n    m.g(0)\nexcept AssertionError as exc:\n"
        "    print(exc, traceback.extract_tb(exc.__traceback__)[-1].lineno)\n"
        "print(m.__cached__)\n"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-B", "-c", probe], check=True, capture_output=True,
        text=True, cwd=tmp_path,
    ).stdout.splitlines()  # fmt: skip
    assert out[0] == "None None None None None Kept: the module reads it. Kept too."
    assert out[1] == "asserts stay 6"
    assert Path(out[2]).is_file()  # the byte code written by slim-venv was the one used
    # Without pip in this venv, setuptools cannot be uninstalled: slim-venv says nothing
    # and does not fail (the package build has pip).
    assert (site / "setuptools").is_dir()


def test_the_package_ships_the_unit_in_packaging() -> None:
    """One unit file: debian/ has none of its own, `make deb` copies packaging/evcp.service."""
    assert not (ROOT / "packaging" / "debian" / "evcp.service").exists()
    makefile = (ROOT / "Makefile").read_text()
    assert "cp packaging/evcp.service $(DEB_DIR)/src/debian/evcp.service" in makefile


def test_one_version_for_the_command_the_package_and_the_metadata() -> None:
    """`evcp --version`, the installed metadata and debian/changelog say the same version
    (debian/rules refuses to build otherwise)."""
    import re

    from agent import __version__

    changelog = (ROOT / "packaging" / "debian" / "changelog").read_text()
    match = re.match(r"evcp \(([^)]+)\)", changelog)
    assert match and match.group(1) == __version__
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.stdout.strip() == f"evcp {__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "agent.__version__" }' in pyproject


def test_the_unit_orders_after_targets_it_does_not_pull_in() -> None:
    unit = (ROOT / "packaging" / "evcp.service").read_text()
    lines = [line.strip() for line in unit.splitlines() if not line.startswith("#")]
    assert "After=time-sync.target network-online.target" in lines
    assert not [line for line in lines if line.startswith(("Wants=", "Requires="))]
    for directive in (
        "RestartPreventExitStatus=2",
        "StateDirectoryMode=0750",
        "UMask=0027",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
        "AmbientCapabilities=CAP_SYS_TIME",
        "SystemCallFilter=@system-service @clock",
    ):
        assert directive in lines, directive


def test_the_unit_exposure_is_at_most_2_3() -> None:
    import re
    import shutil

    import pytest

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(ROOT / "packaging" / "evcp.service")],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for evcp.service: ([\d.]+)", done.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline not supported: {done.stderr[-200:]}")
    assert float(match.group(1)) <= 2.3, done.stdout[-2000:]


def test_the_hashed_lock_pins_every_runtime_requirement() -> None:
    """packaging/requirements-runtime.hashes (make lock-hashes) has every line of
    requirements-runtime.txt, each with at least one sha256."""
    wanted = {
        line.split("#")[0].strip().lower()
        for line in (ROOT / "requirements-runtime.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    hashed = (ROOT / "packaging" / "requirements-runtime.hashes").read_text()
    entries = [e for e in hashed.split("\n") if e and not e.startswith((" ", "#"))]
    pins = {e.split()[0].lower() for e in entries}
    assert pins == wanted
    for block in hashed.split("\n")[2:]:
        if block and not block.startswith(" "):
            assert block.endswith("\\"), block  # a hash follows every pin
    build = (ROOT / "packaging" / "requirements-build.hashes").read_text()
    assert "setuptools==" in build and "--hash=sha256:" in build
