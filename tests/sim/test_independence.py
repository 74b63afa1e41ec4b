"""The simulators are checked against the client, so they must not share its code: a wrong
topic, code or sign in `gatewayd/uplinks/` would otherwise be mirrored and every test pass."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import gatewayd_sim

SIM_ROOT = Path(gatewayd_sim.__file__).parent


def _package(path: Path) -> str:
    return ".".join(("gatewayd_sim", *path.relative_to(SIM_ROOT).with_suffix("").parts[:-1]))


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """Every module a file imports (absolute, or relative resolved against its package),
    including imports inside functions and `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    package = package or _package(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__") and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(module: str) -> bool:
    return module == "gatewayd.uplinks" or module.startswith("gatewayd.uplinks.")


def test_no_simulator_module_imports_the_uplinks() -> None:
    files = sorted(SIM_ROOT.rglob("*.py"))
    assert len(files) > 10  # the walk really sees the simulators (enos, mms, opshub, hw)
    bad = [f"{f.relative_to(SIM_ROOT.parent)}:{line}: {mod}"
           for f in files for line, mod in _imports(f) if _forbidden(mod)]
    assert bad == [], "simulator modules import the client's code:\n" + "\n".join(bad)


def test_the_walk_catches_every_import_form(tmp_path: Path) -> None:
    # the checker itself: each of these forms must be caught
    forms = ["from gatewayd.uplinks.enos import protocol as P",
             "import gatewayd.uplinks.enos.sign",
             "from gatewayd.uplinks import enos",
             "def f():\n    from gatewayd.uplinks.enos.sign import verify",
             "import importlib\nimportlib.import_module('gatewayd.uplinks.enos')"]
    forms.append("from ...uplinks.enos import sign")  # relative, from gatewayd/sim/enos/
    for i, text in enumerate(forms):
        f = tmp_path / f"probe_{i}.py"
        f.write_text(text + "\n")
        assert any(_forbidden(m) for _, m in _imports(f, "gatewayd.sim.enos")), text
    assert not any(_forbidden(m) for _, m in _imports(SIM_ROOT / "enos" / "wire.py"))


def test_importing_the_enos_simulator_loads_no_uplink_module() -> None:
    # the runtime view: a fresh interpreter imports the simulator and lists what got loaded
    import subprocess

    code = ("import sys, gatewayd_sim.enos, gatewayd_sim.enos.hub, gatewayd_sim.enos.simulator;"
            "print('\\n'.join(m for m in sys.modules if m.startswith('gatewayd.uplinks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == []
