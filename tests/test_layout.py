"""The layout's rules, checked on the source: no import cycle in agent/ and drivers/ (those
behind ``TYPE_CHECKING`` and inside functions count too), and every import goes the right
way. A wrong-way import added anywhere makes this fail (``test_the_checker_catches_...``
shows the checker does, on a tree made for it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "drivers")
#: No class in agent/ grows past this many lines (the layout issue's limit).
MAX_CLASS_LINES = 600


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {
        module_name(root, path): path
        for package in PACKAGES
        if (root / package).is_dir()
        for path in sorted((root / package).rglob("*.py"))
    }


def imported(tree: ast.AST, name: str, is_package: bool) -> Iterator[str]:
    """Every module ``name`` imports, wherever the import statement stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"  # a submodule, if it is one


def graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (packages' __init__ included)."""
    known = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for target in imported(tree, name, path.name == "__init__.py"):
            if target in known and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def external(root: Path) -> dict[str, set[str]]:
    """module -> the top-level names of everything it imports."""
    out = {}
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(), str(path))
        out[name] = {t.split(".")[0] for t in imported(tree, name, path.name == "__init__.py")}
        out[name] |= {t for t in imported(tree, name, path.name == "__init__.py")}
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def wrong_way(root: Path) -> list[str]:
    """Imports that go against the layout, one line each."""
    problems = []
    for name, targets in external(root).items():

        def bad(why: str, target: str, name: str = name) -> None:
            problems.append(f"{name} imports {target}: {why}")

        for target in sorted(targets):
            top = target.split(".")[0]
            if name.startswith("drivers") and top == "agent":
                bad("drivers know nothing of the agent", target)
            if top == "ocpp" and not name.startswith("agent.ocpp"):
                bad("only agent/ocpp/ speaks the ocpp library", target)
            if name.startswith("agent.core"):
                if top in ("asyncio", "ocpp", "websockets", "sqlite3", "socket"):
                    bad("agent/core is pure (no I/O, no asyncio)", target)
                if target.startswith("agent.") and not target.startswith("agent.core"):
                    bad("agent/core imports only agent/core", target)
            if name.startswith("agent.features") and target.startswith("agent.chargepoint.station"):
                bad("features reach the charge point through its port, not Station", target)
            if name.startswith("agent.chargepoint") and target.startswith(
                ("agent.features", "agent.ocpp")
            ):
                bad("the charge point sees features only through its port's protocols", target)
            if name.startswith("agent.features") and target.startswith("agent.ocpp"):
                bad("features know nothing of OCPP-J (the handlers translate)", target)
    return sorted(set(problems))


def long_classes(root: Path) -> list[str]:
    out = []
    for name, path in modules(root).items():
        if not name.startswith("agent"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def test_no_import_cycle() -> None:
    assert cycles(graph(ROOT)) == []


def test_every_import_goes_the_right_way() -> None:
    assert wrong_way(ROOT) == []


def test_no_class_in_the_agent_is_over_600_lines() -> None:
    assert long_classes(ROOT) == []


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"drivers/meter/x.py": "import agent.store\n"}, "drivers know nothing of the agent"),
        ({"agent/core/x.py": "import asyncio\n"}, "agent/core is pure"),
        ({"agent/core/x.py": "from agent import store\n"}, "agent/core imports only agent/core"),
        ({"agent/status2.py": "from ocpp.v16 import call\n"}, "only agent/ocpp/ speaks"),
        (
            {"agent/features/f/service.py": "from agent.chargepoint.station import Station\n"},
            "through its port, not Station",
        ),
        (
            {"agent/chargepoint/y.py": "from agent.features.f import service\n"},
            "through its port's protocols",
        ),
    ],
)
def test_the_checker_catches_a_wrong_way_import(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    write(tmp_path, {"agent/__init__.py": "", "drivers/__init__.py": "", **files})
    problems = wrong_way(tmp_path)
    assert any(expected in p for p in problems), problems


def test_the_checker_catches_a_cycle_hidden_behind_type_checking(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "agent/__init__.py": "",
            "agent/a.py": "from agent import b\n",
            "agent/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from agent.a import A\n",
        },
    )
    assert cycles(graph(tmp_path)) == [["agent.a", "agent.b"]]


def test_the_checker_catches_a_long_class(tmp_path: Path) -> None:
    body = "class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES
    write(tmp_path, {"agent/__init__.py": "", "agent/big.py": body})
    assert long_classes(tmp_path) == [f"agent.big.Big: {MAX_CLASS_LINES + 1} lines"]
