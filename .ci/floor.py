"""Print pip constraints pinning every runtime dependency to its floor (`make test-floor`)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors(pyproject: Path) -> dict[str, str]:
    out = {}
    for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*([^;]*)", dep)
        if not m:
            continue
        low = re.search(r">=\s*([0-9][^,\s]*)", m.group(2))
        if low is None:
            if "==" not in m.group(2):
                sys.exit(f"{pyproject}: {dep!r} has no floor (>=)")
            continue
        out[m.group(1).lower()] = low.group(1)
    return out


if __name__ == "__main__":
    pins = {**floors(ROOT / "sim" / "pyproject.toml"), **floors(ROOT / "pyproject.toml")}
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
