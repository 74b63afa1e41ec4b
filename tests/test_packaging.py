"""Packaging: the daemon's wheel carries no simulator, and without the gatewayd-sim distribution
`gatewayd sim` says how to get it (exit 2) and `sim:` buses give a clear error.

The wheel is built from a copy of this checkout (`pip wheel --no-deps`, offline: the build backend
comes from the dev venv), then installed alone into a throwaway venv. The daemon's third-party
dependencies are reached through a directory of links to the dev venv's packages that leaves out
gatewayd, drivers and gatewayd_sim, so nothing but the wheel provides our code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

OURS = ("gatewayd", "drivers", "gatewayd_sim", "__editable__", "_gatewayd", "distutils-precedence")


def _copy_checkout(dest: Path) -> Path:
    """This checkout without venvs, caches and stale build trees (setuptools would pack a stale
    build/lib into the wheel)."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.db*")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_checkout(base / "src")
    # a checkout of its own, so the build stamps a commit this test knows
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(src)], check=True, timeout=60)
    subprocess.run([*git, "add", "-A"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "packaging test"], check=True, timeout=60)
    commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], check=True, timeout=60,
                            capture_output=True, text=True).stdout.strip()
    (base / "commit").write_text(commit)
    out = base / "out"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("gatewayd-*.whl")
    return whl


@pytest.fixture(scope="module")
def bare_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the gatewayd wheel and links to its third-party dependencies."""
    base = tmp_path_factory.mktemp("venv")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    deps = base / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(OURS) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "zz_deps.pth").write_text(f"{deps}\n")
    return venv


def test_wheel_has_no_simulator(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_dir = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{meta_dir}/entry_points.txt").decode()
        size = sum(i.file_size for i in z.infolist())
    print(f"\ngatewayd wheel: {wheel.stat().st_size / 1024:.0f} KB compressed, "
          f"{size / 1024:.0f} KB installed, {len(names)} files")
    modules = [n for n in names if n.endswith(".py")]
    assert any(n == "gatewayd/cli.py" for n in modules) and any(n == "drivers/bus.py" for n in modules)
    leaked = [n for n in names if n.startswith(("gatewayd_sim/", "gatewayd/sim/", "drivers/sim/"))
              or "/sim/" in n]
    assert leaked == [], f"simulator modules in the daemon's wheel: {leaked}"
    assert "gatewayd.simulators" not in entry_points and "gatewayd.i2c_emulators" not in entry_points
    assert "gatewayd = gatewayd.cli:main" in entry_points


def test_sim_distribution_declares_the_entry_points() -> None:
    """The sim distribution provides what the daemon looks up, at the daemon's version."""
    import tomllib

    sim = tomllib.loads((ROOT / "sim" / "pyproject.toml").read_text())
    daemon = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = sim["project"]["entry-points"]
    assert set(eps["gatewayd.simulators"]) == {"enos", "mms", "opshub"}
    assert eps["gatewayd.i2c_emulators"]["sim"] == "gatewayd_sim.hw.i2c:sim_bus"
    assert f"gatewayd=={daemon['project']['version']}" in sim["project"]["dependencies"]


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=venv.parent, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin"})


def test_gatewayd_sim_without_the_sim_package(bare_venv: Path, wheel: Path) -> None:
    gatewayd = str(bare_venv / "bin" / "gatewayd")
    for argv in (["sim"], ["sim", "enos", "--port", "0"], ["sim", "mms"]):
        r = _run(bare_venv, gatewayd, *argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert "pip install gatewayd-sim" in r.stderr and "./sim" in r.stderr
        assert "Traceback" not in r.stderr
    version = _run(bare_venv, gatewayd, "--version")
    commit = (wheel.parent.parent / "commit").read_text()  # the wheel's checkout, stamped
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"gatewayd 0.1.0 (commit {commit})"


def test_bare_install_imports_every_module_and_sim_bus_says_what_is_missing(bare_venv: Path) -> None:
    """Every daemon module imports without the simulators; a `sim:` bus names the package."""
    script = """
import importlib, pkgutil, sys
import gatewayd, drivers
assert "site-packages" in gatewayd.__file__, gatewayd.__file__
for pkg in (gatewayd, drivers):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
assert not [m for m in sys.modules if m.startswith("gatewayd_sim")]
try:
    importlib.import_module("gatewayd_sim")
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("gatewayd_sim importable in the bare venv")
from drivers.bus import BusManager
try:
    BusManager().i2c("sim:bench")
except ValueError as exc:
    print(exc)
else:
    raise SystemExit("sim: bus opened without the simulators")
"""
    r = _run(bare_venv, str(bare_venv / "bin" / "python"), "-c", script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip install gatewayd-sim" in r.stdout


def test_version_from_a_checkout_names_its_commit() -> None:
    """Run in place (editable install in this checkout), --version asks git."""
    r = subprocess.run([sys.executable, "-m", "gatewayd", "--version"], capture_output=True,
                       text=True, timeout=60, cwd="/")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert r.stdout.startswith(f"gatewayd 0.1.0 (commit {head.stdout.strip()}")
    else:
        assert r.stdout.strip() == "gatewayd 0.1.0"


def test_installed_sim_registers_through_entry_points() -> None:
    """In the dev venv (both distributions installed) the CLI lists the simulators and the bus
    manager opens a `sim:` bus through the entry point, reaching the same emulated adapter."""
    from gatewayd.cli import build_parser

    choices = next(a for a in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                   if a.dest == "command").choices["sim"]
    sims = next(a for a in choices._subparsers._group_actions if a.dest == "simulator").choices
    assert {"enos", "mms", "opshub"} <= set(sims)

    from drivers.bus import BusManager
    from gatewayd_sim.hw.i2c import drop_sim_bus, sim_bus

    try:
        bus = BusManager().i2c("sim:packaging-test")
        assert bus.sim is sim_bus("packaging-test")
    finally:
        drop_sim_bus("packaging-test")
