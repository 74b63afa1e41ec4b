"""`make soak`: the long fault campaign against the real daemon, outside `make test`.

Scenarios (each a series of runs under a steady 500 readings/s stream, ended at random moments;
then one clean run that delivers what is left):
- SIGKILL x 20 with the cloud up, down, and mixed (down in a random half of the runs);
- ENOSPC: the state dir on a small tmpfs, filled until the queue degrades, then freed;
- power cuts x 50 on a LazyFS-style FUSE filesystem (data not fsynced is lost), for the
  default fsync="always" and for "normal"; the cloud is down in a random half of the runs.

Prints one table: scenario, trials, accepted (readings whose commit was reported), lost (of
those, never delivered), max duplicates per restart, crashes. Needs root (tmpfs, FUSE).

    python bench/soak.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Daemon  # noqa: E402
from tests.powercut import Result, campaign, power_cuts  # noqa: E402
from tests.test_storage import fill  # noqa: E402


def _enospc(tmp: Path, trials: int) -> Result:
    state = tmp / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    degraded = 0

    def during(d: Daemon, rng: Any) -> None:
        nonlocal degraded
        filler = fill(state)
        try:
            d.event("queue_storage_degraded", timeout=60)
            degraded += 1
            time.sleep(rng.uniform(0.1, 1.0))  # the condition lasts a random while
        finally:
            filler.unlink()
        d.event("queue_storage_recovered", timeout=60)

    try:
        res = campaign(tmp, "ENOSPC (fill, free, SIGKILL)", trials, during=during, seed=5,
                       cloud_down=lambda i, rng: True)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
    res.notes.append(f"degraded and recovered {degraded} times")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the trials (a smoke run)")
    args = ap.parse_args()
    k = 5 if args.quick else 1
    scenarios = [
        ("SIGKILL, cloud up", lambda t: campaign(t, "SIGKILL, cloud up", 20 // k, seed=1)),
        ("SIGKILL, cloud down", lambda t: campaign(t, "SIGKILL, cloud down", 20 // k, seed=2,
                                                   cloud_down=lambda i, rng: True)),
        ("SIGKILL, cloud mixed", lambda t: campaign(t, "SIGKILL, cloud mixed", 20 // k, seed=3,
                                                    cloud_down=lambda i, rng: rng.random() < 0.5)),
        ("ENOSPC", lambda t: _enospc(t, 10 // k)),
        ("power cut, fsync=always", lambda t: power_cuts(t, 50 // k, "always", seed=8)),
        ("power cut, fsync=normal", lambda t: power_cuts(t, 50 // k, "normal", seed=9)),
    ]
    print("| scenario | trials | accepted | lost | max duplicates per restart | crashes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    notes = []
    for name, run in scenarios:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            res = run(Path(tmp))
        print(res.row(), flush=True)
        if res.reused:
            notes.append(f"{name}: {res.reused} seqs named two readings")
        if res.reported_lost:
            notes.append(f"{name}: the daemon reported {res.reported_lost} readings lost "
                         "(queue_state_lost)")
        notes += [f"{name}: {n}" for n in res.notes]
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
