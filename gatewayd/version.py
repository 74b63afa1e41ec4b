"""`gatewayd --version`: the release and, when built or run from a git checkout, the commit.

A wheel or sdist built from a checkout carries the commit in `gatewayd/_commit.txt` (written by
setup.py at build time); a checkout run in place (editable install, `python -m gatewayd`) asks
git. Only `--version` pays for this: the daemon's start-up runs no git.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from gatewayd import __version__

HERE = Path(__file__).resolve().parent


def git_commit(path: Path) -> str | None:
    """The short HEAD commit of the checkout holding `path` (with "-dirty" if it has
    uncommitted changes to tracked files), or None outside a checkout or without git."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def commit() -> str | None:
    stamped = HERE / "_commit.txt"
    if stamped.is_file():
        return stamped.read_text().strip() or None
    if (HERE.parent / "pyproject.toml").is_file():  # run from the source tree, not site-packages
        return git_commit(HERE.parent)
    return None


def version_string() -> str:
    c = commit()
    return f"gatewayd {__version__}" + (f" (commit {c})" if c else "")


class VersionAction(argparse.Action):
    """Like argparse's "version" action, but works out the commit only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version (and the git commit it was built from) and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_string())
        parser.exit()
