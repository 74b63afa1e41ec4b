"""Power cuts on a LazyFS-style FUSE filesystem (tests/lazyfs.py): written data lives in the
filesystem process's memory until fsync, and killing that process is the cut. The long
campaign (50 cuts) is in `make soak`."""

from __future__ import annotations

from pathlib import Path

from .powercut import power_cuts


def test_power_cuts_lose_no_reported_commit_with_default_fsync(tmp_path: Path) -> None:
    res = power_cuts(tmp_path, cuts=20, fsync="always")
    assert res.crashes == 0, res.notes
    assert res.trials == 20
    assert res.accepted > 20 * 100
    assert res.lost == 0, f"{res.lost} readings lost whose commit was reported"
    assert res.reused == 0
    assert res.reported_lost == 0  # no state loss detected either


def test_power_cuts_with_fsync_normal_are_counted_and_never_reuse_a_seq(tmp_path: Path) -> None:
    res = power_cuts(tmp_path, cuts=5, fsync="normal", seed=11)
    assert res.crashes == 0, res.notes
    assert res.accepted > 5 * 100
    # What a cut costs with "normal" is measured, not promised: make soak prints it. Whatever
    # was lost, no seq may name two readings.
    assert res.reused == 0
