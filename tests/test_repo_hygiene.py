"""Tracked files carry no leftover merge-conflict markers (a half-resolved merge once reached .ci/run)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(rb"^(<{7} |={7}$|>{7} )", re.MULTILINE)


def test_no_conflict_markers_in_tracked_files() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    bad = []
    for name in filter(None, files.split(b"\0")):
        path = ROOT / name.decode()
        if not path.is_file() or path.suffix in {".png", ".whl", ".gz"}:
            continue
        if MARKER.search(path.read_bytes()):
            bad.append(name.decode())
    assert bad == [], f"merge-conflict markers left in: {bad}"
