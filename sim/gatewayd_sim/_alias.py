"""`gatewayd.sim.X` as another name for `gatewayd_sim.X`.

The simulators left the daemon's wheel for this distribution, but external benches import them
by the old name (the TB-GW harness's counter: `from gatewayd.sim.enos import EnosSimulator`).
`install()` adds an import hook that maps the old names onto the modules of this package (the
same module objects, not second copies). bench/tbgw_run.py enables it in that harness's venv
with a one-line .pth file; nothing enables it anywhere else.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

OLD = "gatewayd.sim"
NEW = "gatewayd_sim"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != OLD and not name.startswith(OLD + "."):
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(NEW + spec.name[len(OLD):])
        self._spec = module.__spec__  # the import system overwrites it: put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
