"""What the Debian package ships: the venv trimmed by packaging/slim-venv, and one unit."""

from __future__ import annotations

import importlib.util
import marshal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_slim_venv_compiles_byte_code_without_column_tables(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "evcp_probe.py").write_text("def f(a, b):\n    return a.x + b.y\n")
    (site / "distutils-precedence.pth").write_text("import os\n")  # as setuptools leaves it
    (site / "setuptools").mkdir()
    subprocess.run([str(ROOT / "packaging" / "slim-venv"), str(venv)], check=True)
    pyc = Path(importlib.util.cache_from_source(str(site / "evcp_probe.py")))
    code = marshal.loads(pyc.read_bytes()[16:])
    function = next(c for c in code.co_consts if hasattr(c, "co_positions"))
    positions = list(function.co_positions())
    assert positions and all(column is None for _, _, column, _ in positions)
    assert {line for line, *_ in positions if line} == {1, 2}  # line numbers stay
    # Without pip in this venv, setuptools cannot be uninstalled: slim-venv says nothing
    # and does not fail (the package build has pip).
    assert (site / "setuptools").is_dir()


def test_the_package_ships_the_unit_in_packaging() -> None:
    """One unit file: debian/ has none of its own, `make deb` copies packaging/evcp.service."""
    assert not (ROOT / "packaging" / "debian" / "evcp.service").exists()
    makefile = (ROOT / "Makefile").read_text()
    assert "cp packaging/evcp.service build/deb/src/debian/evcp.service" in makefile
