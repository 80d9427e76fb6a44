"""``make bench`` leaves nothing behind: every temporary directory a bench script makes
comes from its ``scratch()``, which removes it when the script exits, also after a failure
(shown by running a script that fails after making one)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_bench_temp_dir_comes_from_scratch() -> None:
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "mkdtemp" and func.name != "scratch"):  # fmt: skip
                    offenders.append(f"{path.name}:{node.lineno} in {func.name}")
    assert offenders == []


def test_scratch_removes_its_directory_after_a_failure(tmp_path: Path) -> None:
    source = (ROOT / "bench" / "bench_queue.py").read_text()
    tree = ast.parse(source)
    scratch = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "scratch")
    script = tmp_path / "failing_bench.py"
    script.write_text(
        "import atexit, shutil, tempfile\nfrom pathlib import Path\n"
        + ast.get_source_segment(source, scratch)  # type: ignore[operator]
        + textwrap.dedent(f"""
            work = scratch("evcp-bench-test-", {str(tmp_path)!r})
            (work / "state").mkdir()
            print(work, flush=True)
            raise RuntimeError("the bench failed")
            """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1 and "the bench failed" in done.stderr
    made = Path(done.stdout.strip())
    assert made.parent == tmp_path and not made.exists()
