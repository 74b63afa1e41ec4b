"""Fault campaign helpers shared by the tests and `make soak`: the daemon's state dir on the
LazyFS-style FUSE filesystem (tests/lazyfs.py), power cuts, SIGKILLs, and the accounting of
what was accepted, lost and sent twice."""

from __future__ import annotations

import json
import random
import select
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conftest import ROOT, Daemon
from .test_daemon import committed

LAZYFS = Path(__file__).with_name("lazyfs.py")


class LazyMount:
    """tests/lazyfs.py as a process: `start()` mounts, `cut()` is the power cut."""

    def __init__(self, backing: Path, mnt: Path) -> None:
        self.backing, self.mnt = backing, mnt
        backing.mkdir(parents=True, exist_ok=True)
        mnt.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LazyMount:
        self.proc = subprocess.Popen([sys.executable, str(LAZYFS), str(self.backing), str(self.mnt)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)  # failure bound only
        line = self.proc.stdout.readline() if ready else b""
        assert line.strip() == b"ready", f"lazyfs did not mount: {line!r}"
        return self

    def cut(self) -> None:
        """Power cut: everything not fsynced is gone with the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        self.proc = None


def config(tmp: Path, state: Path, fsync: str, pause: bool = False) -> Path:
    text = textwrap.dedent(f"""
        [gateway]
        id = "cut-gw"
        state_dir = "{state}"
        stop_timeout = "10s"

        [queue]
        commit_window = "50ms"
        gc_interval = "300ms"
        fsync = "{fsync}"

        [log]
        level = "debug"
        format = "json"

        [health]
        enabled = false

        [[devices]]
        name = "stream"
        driver = "sim"
        interval = "20ms"
        jitter = 0.0
        count = 9
        points.v = {{ shape = "ramp", min = 0, max = 1000, period = "7s" }}

        [uplinks.archive]
        type = "jsonl"
        path = "{tmp / 'out.jsonl'}"
        batch = 200
        linger = "20ms"
        pause_file = "{tmp / 'pause'}"
        retry_max = "200ms"
    """)
    path = tmp / f"gatewayd-{fsync}.toml"
    path.write_text(text)
    return path


def archive(path: Path) -> list[dict[str, Any]]:
    """The archive's lines (the cloud's view); a line torn by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@dataclass
class Result:
    scenario: str
    trials: int = 0
    accepted: int = 0  # readings whose commit the daemon reported
    lost: int = 0  # of those, never delivered
    max_dupes: int = 0  # most readings delivered again after one restart
    crashes: int = 0  # the daemon exited by itself, or not 0 on SIGTERM
    reused: int = 0  # seqs that named two different readings
    reported_lost: int = 0  # what the daemon itself counted as state loss
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        return (f"| {self.scenario} | {self.trials} | {self.accepted:,} | {self.lost:,} | "
                f"{self.max_dupes:,} | {self.crashes} |")


def account(res: Result, events: list[dict[str, Any]], out: Path, segments: list[int]) -> None:
    """Fill accepted / lost / duplicates / reuse from the daemon's log and the archive."""
    rows = archive(out)
    delivered = {r["seq"] for r in rows}
    reported = committed(events)
    res.accepted = len(reported)
    res.lost = len(reported - delivered)
    res.reported_lost = sum(e.get("lost", 0) for e in events if e.get("event") == "queue_state_lost")
    by_seq: dict[int, tuple[Any, ...]] = {}
    seen: set[int] = set()
    bounds = [*segments, len(rows)]
    for i in range(len(bounds) - 1):
        dupes = 0
        for r in rows[bounds[i]:bounds[i + 1]]:
            key = (r["device"], r["point"], r["ts_ms"], r["value"])
            if by_seq.setdefault(r["seq"], key) != key:
                res.reused += 1
            if r["seq"] in seen:
                dupes += 1
            seen.add(r["seq"])
        res.max_dupes = max(res.max_dupes, dupes)


def power_cuts(tmp: Path, cuts: int, fsync: str, seed: int = 7) -> Result:
    """`cuts` power cuts at random moments under a steady stream, then a clean final run. The
    cloud is down in a random half of the runs, so the queue alone holds what was accepted."""
    return campaign(tmp, f"power cut, fsync={fsync}", cuts, fsync, fuse=True, seed=seed,
                    cloud_down=lambda i, rng: rng.random() < 0.5)


def campaign(tmp: Path, scenario: str, trials: int, fsync: str = "always", *, fuse: bool = False,
             cloud_down: Any = None, seed: int = 7, during: Any = None) -> Result:
    """`trials` runs of the daemon under a steady stream, each ended by SIGKILL (and a power cut
    when `fuse`) at a random moment; then a final run that stops cleanly and delivers the rest.

    `cloud_down(i, rng)` says whether the cloud is unreachable in run i (default: never);
    `during(daemon, rng)` runs inside each trial before the kill (e.g. fill the disk).
    """
    rng = random.Random(seed)
    res = Result(scenario)
    mount = LazyMount(tmp / "backing", tmp / "mnt") if fuse else None
    state = tmp / "mnt" / "state" if fuse else tmp / "state"
    cfg = config(tmp, state, fsync)
    out, pause = tmp / "out.jsonl", tmp / "pause"
    log = tmp / f"daemon-{scenario.replace(' ', '_').replace('=', '-').replace(',', '')}.log"
    events: list[dict[str, Any]] = []
    segments: list[int] = []
    try:
        for i in range(trials + 1):
            final = i == trials
            down = not final and cloud_down is not None and cloud_down(i, rng)
            if down:
                pause.touch()
            else:
                pause.unlink(missing_ok=True)
            segments.append(len(archive(out)))
            if mount is not None:
                mount.start()
            d = Daemon(cfg, log).start()
            try:
                d.event("gateway_ready", timeout=60)
                # Wait for a random amount of committed readings (commits are adaptive: their
                # number says little about how much was stored).
                want, got = (100 if final else rng.randint(50, 400)), 0
                while got < want:
                    got += int(d.event("queue_committed", timeout=60).get("count", 0))
                if final:
                    if d.stop(timeout=60) != 0:
                        res.crashes += 1
                else:
                    if during is not None:
                        during(d, rng)
                    time.sleep(rng.uniform(0, 0.05))  # a random moment within the window
                    d.kill()
                    res.trials += 1
            except AssertionError as exc:  # the daemon died by itself
                res.crashes += 1
                res.notes.append(str(exc)[:300])
            finally:
                d.ensure_dead()
                events += d.events
                if mount is not None:
                    mount.cut()
    finally:
        if mount is not None:
            mount.cut()
        pause.unlink(missing_ok=True)
    account(res, events, out, segments)
    return res


__all__ = ["ROOT", "LazyMount", "Result", "account", "archive", "campaign", "committed", "config",
           "power_cuts"]
