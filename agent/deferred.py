"""Defer heavy standard-library imports that a dependency makes but does not use.

- ``websockets`` 17 runs ``import importlib.metadata`` in ``websockets/version.py``
  (released versions hard-code their version string and never call it) and
  ``import urllib.request`` in ``websockets/proxy.py`` (used only to read proxy settings
  from the environment, which the agent does not do: see ``[csms] proxy``). They pull in
  ``email``, ``csv``, ``http.client`` and more.
- ``shutil`` (imported by ``argparse`` and ``tempfile``) and ``zipfile`` import ``bz2`` and
  ``lzma`` for archive formats the agent never reads or writes; each loads a C extension
  and a compression library. ``shutil`` itself is used by the agent only when a state
  file is corrupt, a certificate is replaced or a firmware file is moved: deferred too.
- ``importlib.resources`` (the agent reads its meter maps with it, ``jsonschema`` its
  meta-schemas) imports ``zipfile`` for packages installed as zip files and ``tempfile``
  for extracting from them; the agent's packages are plain directories.

Together about 2.4 MiB of resident memory (measured with bench/bench_agent.py), 7 % of the
agent's budget, for code that never runs.

:func:`defer` puts a placeholder module in ``sys.modules``. ``import x`` then binds the
placeholder; the first attribute looked up on it imports the real module, and from then
on the placeholder forwards every lookup, assignment and deletion to it, so code that does
use the module (or patches it) still works, just later. (The standard library's ``importlib.util.LazyLoader`` cannot do this on Python 3.11:
the import statement itself reads ``__spec__`` through the module, which triggers the load.)

The ``evcp`` command calls :func:`defer_unused` first thing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_REAL = "_deferred_real_module"


class _Deferred(types.ModuleType):
    """Placeholder for a module not imported yet. It holds only ``__name__`` and
    ``__spec__`` (what the import system reads); anything else imports the real module
    and is forwarded to it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load(self), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_load(self), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(_load(self), name)


def _load(placeholder: _Deferred) -> types.ModuleType:
    namespace = vars(placeholder)
    real: types.ModuleType | None = namespace.get(_REAL)
    if real is None:
        name = namespace["__name__"]
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
        # The import system's own per-module lock serialises concurrent first uses.
        real = importlib.import_module(name)
        namespace[_REAL] = real
    return real


def defer(name: str) -> bool:
    """Defer importing module *name* until an attribute of it is used.

    Returns False (and does nothing) when the module is already imported or cannot be
    found; True when a placeholder was installed.
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    placeholder = _Deferred(name)
    namespace = vars(placeholder)  # not setattr: that would load the module
    for unset in ("__doc__", "__package__", "__loader__"):  # forwarded once loaded
        namespace.pop(unset, None)
    namespace["__spec__"] = spec
    sys.modules[name] = placeholder
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, placeholder)
    return True


#: Imported by dependencies, never (or seldom) used by the agent (see the module
#: docstring), each with the C extension it needs: a Python built without it must see the
#: ImportError at ``import`` time, as the importers expect, not later.
UNUSED = (
    ("importlib.metadata", None),
    ("urllib.request", None),
    ("bz2", "_bz2"),
    ("lzma", "_lzma"),
    ("zipfile", None),
    ("tempfile", None),
    ("shutil", None),
)


def defer_unused() -> None:
    for name, needs in UNUSED:
        if needs is None or importlib.util.find_spec(needs) is not None:
            defer(name)


def is_loaded(name: str) -> bool:
    """True when module *name* has really been imported (not only deferred)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)
