"""Build hooks (everything else is in pyproject.toml): stamp the git commit into the package.

A wheel built from a checkout gets `gatewayd/_commit.txt`; an sdist built from a checkout carries
the file, so a wheel built from that sdist has it too. Outside a checkout nothing is written and
`gatewayd --version` shows the release alone.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
STAMP = Path("gatewayd") / "_commit.txt"


def _commit() -> str | None:
    if (ROOT / STAMP).is_file():  # building from an sdist that carries it
        return (ROOT / STAMP).read_text().strip() or None
    if not (ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        c = _commit()
        if c and not self.editable_mode:
            (Path(self.build_lib) / STAMP).write_text(c + "\n")


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        c = _commit()
        if c:
            target = Path(base_dir) / STAMP
            target.unlink(missing_ok=True)  # a hard link to the source tree's copy, if any
            target.write_text(c + "\n")


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
