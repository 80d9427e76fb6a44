"""agent.deferred: a deferred module costs nothing until used, and then works as usual.

Each case runs in a fresh interpreter: pytest itself has imported these modules long ago.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_binds_a_placeholder_and_first_use_loads_the_real_module() -> None:
    out = run(
        """
        import sys
        from agent import deferred
        assert deferred.defer("importlib.metadata")
        import importlib.metadata
        import websockets  # imports importlib.metadata at the top, as in production
        assert not deferred.is_loaded("importlib.metadata")
        assert "zipfile" not in sys.modules and "email" not in sys.modules
        early = importlib.metadata          # the placeholder, as websockets holds it
        # First use: the real import happens here.
        print(early.version("websockets") == websockets.version.version)
        assert deferred.is_loaded("importlib.metadata")
        assert "zipfile" in sys.modules
        from importlib.metadata import version, PackageNotFoundError
        print(version("ocpp") != "", early.PackageNotFoundError is PackageNotFoundError)
        """
    )
    assert out.split() == ["True", "True", "True"]


def test_the_placeholder_forwards_to_the_real_module_after_loading() -> None:
    out = run(
        """
        import sys
        from agent import deferred
        deferred.defer("bz2")
        import bz2
        early = bz2                      # what shutil or zipfile would hold
        early.evcp_marker = 1            # an assignment loads and reaches the real module
        real = sys.modules["bz2"]
        print(real is not early, real.evcp_marker)
        real.evcp_marker = 2             # a later rebinding is seen through the placeholder
        print(early.evcp_marker, early.__loader__ is real.__loader__)
        del early.evcp_marker
        print(hasattr(real, "evcp_marker"))
        """
    )
    assert out.split() == ["True", "1", "2", "True", "False"]


def test_the_evcp_command_defers_before_anything_imports_them(tmp_path: Path) -> None:
    config = tmp_path / "evcp.toml"
    config.write_text((ROOT / "etc" / "sim.toml").read_text())
    out = run(
        f"""
        import sys
        from agent import cli, deferred
        assert cli.main(["check-config", "--config", {str(config)!r}]) == 0
        print([(n, n in sys.modules, deferred.is_loaded(n)) for n, _ in deferred.UNUSED])
        """
    )
    assert "OK" in out
    assert "('bz2', True, False)" in out and "('importlib.metadata', True, False)" in out


def test_submodule_of_a_deferred_package_imports_normally() -> None:
    out = run(
        """
        from agent import deferred
        deferred.defer("importlib.metadata")
        from importlib.metadata import _text
        print(_text.FoldedCase("A") == "a")
        """
    )
    assert out.split() == ["True"]


def test_already_imported_or_missing_modules_are_left_alone() -> None:
    out = run(
        """
        import json, sys
        from agent import deferred
        print(deferred.defer("json"), deferred.defer("no_such_module_evcp"))
        print(sys.modules["json"] is json, "no_such_module_evcp" in sys.modules)
        """
    )
    assert out.split() == ["False", "False", "True", "False"]


def test_archive_formats_still_work_after_defer_unused(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "evcp.log").write_text("line\n" * 100)
    out = run(
        f"""
        import sys
        from agent import deferred
        deferred.defer_unused()
        import shutil, tarfile
        print("_bz2" in sys.modules, "_lzma" in sys.modules)
        for fmt in ("bztar", "xztar"):
            archive = shutil.make_archive({str(tmp_path / "diag")!r} + fmt, fmt,
                                          root_dir={str(tmp_path / "logs")!r})
            with tarfile.open(archive) as tar:
                print(tar.extractfile("./evcp.log").read().count(b"line"))
        """
    )
    assert out.split() == ["False", "False", "100", "100"]


def test_the_running_agent_never_loads_zipfile_or_tempfile_yet_both_work_on_use() -> None:
    """What ``evcp run`` imports and uses at start (the meter maps and jsonschema's
    meta-schemas through importlib.resources, the OCPP schemas) needs neither module;
    code that does use them later gets the real thing."""
    out = run(
        """
        import sys
        from agent import deferred
        deferred.defer_unused()
        import agent.app, agent.hardware
        from drivers.meter.maps import available_models, load_map
        from ocpp.messages import Call, validate_payload
        print(load_map("sdm630").model != "", "sdm630" in available_models())
        validate_payload(Call("1", "Heartbeat", {}), "1.6")
        print(deferred.is_loaded("zipfile"), deferred.is_loaded("tempfile"))
        import tempfile, zipfile
        with tempfile.TemporaryDirectory() as scratch:
            with zipfile.ZipFile(scratch + "/a.zip", "w") as archive:
                archive.writestr("a.txt", "evcp")
            print(zipfile.ZipFile(scratch + "/a.zip").read("a.txt").decode())
        print(deferred.is_loaded("zipfile"), deferred.is_loaded("tempfile"))
        """
    )
    assert out.split() == ["True", "True", "False", "False", "evcp", "True", "True"]
