"""Run the TB-GW harness (../shared/bench/tbgw) for one gateway and preset, and check gatewayd's
own account of the run against the harness's.

    .venv/bin/python bench/tbgw_run.py gatewayd stress [--py-spy out.txt] [--perf out.data]

It runs `flock /tmp/gatewayd-bench.lock <harness>/run.sh GATEWAY PRESET` from this checkout and
echoes the harness's summary line. For gatewayd it also, at the window's start and end (the
harness prints "window" at its start), scrapes gatewayd's /metrics from inside the harness's
network namespace (nsenter, when run as root), and then prints per unit:
- the polls the slave served in the window (the harness's `missed` is expected - served), and
  their spread (max - min) / mean: the fairness of the port's service;
- gatewayd_device_missed_polls_total over the window against the harness's missed per unit
  (expected - served): the largest difference, which should be at most 1 (window edges).
It also prints the CPU each of gatewayd's threads used in the window, user and kernel time apart
(from /proc/PID/task: kernel time is epoll, timers, pty and disk I/O, which py-spy cannot see),
its precise run time and its wake-ups per second (schedstat).
With --py-spy it records the gateway for the window (`py-spy record --nonblocking`, raw
collapsed stacks, --py-spy-rate samples per second) and prints the top frames by own and by
total samples. py-spy counts a thread inside a system call (a pty write, an fsync) as busy and
drops many samples at high rates, so its shares are relative, and only of Python frames.
With --perf it records every thread with `perf record -e cpu-clock -g` (CPU time only, kernel
and C libraries included) and prints the CPU by library and the kernel's by system call.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("TBGW_HARNESS", ROOT.parent / "shared" / "bench" / "tbgw"))
BASE = Path(os.environ.get("TMPDIR", "/tmp")) / "gw-bench"

_SCRAPER = r"""
import json, re, sys, urllib.request
url = sys.argv[1]
rx = re.compile(r'^gatewayd_device_missed_polls_total\{device="([^"]+)"\} ([0-9.e+]+)$', re.M)
# whole-daemon counters: commits and the readings they wrote
tx = re.compile(r'^(gatewayd_queue_commit_seconds_count|gatewayd_readings_queued_total)'
                r'(?:\{[^}]*\})? ([0-9.e+]+)$', re.M)
for _ in sys.stdin:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        totals = {}
        for k, v in tx.findall(text):
            totals[k] = totals.get(k, 0.0) + float(v)
        print(json.dumps({"missed": {d: float(v) for d, v in rx.findall(text)},
                          "totals": totals}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
"""


def gateway_pid(run_dir: Path) -> int | None:
    toml = str(run_dir / "gatewayd.toml")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if toml.encode() in argv and b"run" in argv:
            return int(d.name)
    return None


class Scraper:
    """gatewayd's missed-polls counters, read from inside the gateway's network namespace."""

    def __init__(self, pid: int, port: int) -> None:
        cmd = [sys.executable, "-u", "-c", _SCRAPER, f"http://127.0.0.1:{port}/metrics"]
        if os.geteuid() == 0:
            cmd = ["nsenter", "-t", str(pid), "-n", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def scrape(self) -> tuple[float, dict[str, float], dict[str, float]]:
        """(time, missed polls by device, whole-daemon totals)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        t = time.time()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        got = json.loads(self.proc.stdout.readline())
        return t, got.get("missed", {}), got.get("totals", {})

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


def thread_times(pid: int) -> dict[int, tuple[str, int, int, int, int]]:
    """tid -> (name, utime, stime, run_ns, slices) for every thread of `pid`: user and kernel
    time in clock ticks (stat), precise run time and times scheduled in (schedstat)."""
    out: dict[int, tuple[str, int, int, int, int]] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for t in tasks:
        try:
            stat = (t / "stat").read_text()
            sched = (t / "schedstat").read_text().split()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(t.name)] = (name, int(fields[11]), int(fields[12]), int(sched[0]), int(sched[2]))
    return out


def print_thread_times(t0: dict[int, tuple[str, int, int, int, int]],
                       t1: dict[int, tuple[str, int, int, int, int]], seconds: float) -> None:
    """The CPU each thread used between two `thread_times` readings: user and kernel apart (in
    clock ticks, so coarse), its precise run time, and its wake-ups (times scheduled in) per
    second, which on an idle core cost more than most of the work they do."""
    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    for tid, (name, u1, s1, r1, n1) in t1.items():
        _, u0, s0, r0, n0 = t0.get(tid, (name, 0, 0, 0, 0))
        rows.append((tid, name, (u1 - u0) / hz, (s1 - s0) / hz, (r1 - r0) / 1e9, n1 - n0))
    user = sum(r[2] for r in rows)
    kern = sum(r[3] for r in rows)
    run = sum(r[4] for r in rows)
    wakes = sum(r[5] for r in rows)
    print(f"# CPU by thread over {seconds:.0f} s: user {100 * user / seconds:.2f} % "
          f"kernel {100 * kern / seconds:.2f} % (ticks); run {100 * run / seconds:.2f} % "
          f"(schedstat); {wakes / seconds:.0f} wake-ups/s")
    for tid, name, u, k, r, n in sorted(rows, key=lambda r: -r[4]):
        print(f"  tid {tid} {name:<16} user {100 * u / seconds:5.2f} %  kernel {100 * k / seconds:5.2f} %"
              f"  run {100 * r / seconds:5.2f} %  {n / seconds:6.0f} wake-ups/s"
              f"  {1e6 * r / n if n else 0:6.0f} us/wake-up")


def summarize_pyspy(path: Path, top: int = 25) -> None:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    print(f"# py-spy: {samples} samples")
    print("# by own samples:")
    for f, n in own.most_common(top):
        print(f"  {100 * n / samples:5.1f}%  {f}")
    print("# by total samples (the frame or its callees):")
    for f, n in total.most_common(top):
        print(f"  {100 * n / samples:5.1f}%  {f}")


def summarize_perf(path: Path, top: int = 12) -> None:
    """The CPU split that py-spy cannot see: user code by library against the kernel, and the
    kernel's share by system call (inclusive), from `perf record -e cpu-clock -g`."""
    def report(*extra: str) -> list[tuple[float, str]]:
        out = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "-q", "-g", "none",
                              *extra], capture_output=True, text=True, timeout=300).stdout
        rows = []
        for line in out.splitlines():
            m = re.match(r"\s*([0-9.]+)%\s+(?:[0-9.]+%\s+)?(.+?)\s*$", line)
            if m:
                rows.append((float(m.group(1)), m.group(2)))
        return rows

    dsos = report("--no-children", "--sort", "dso")
    print("# perf (cpu-clock, every thread of the gateway): own samples by library")
    for pct, name in dsos[:top]:
        print(f"  {pct:5.1f}%  {name}")
    calls: dict[str, float] = {}
    for pct, name in report("--children", "--sort", "sym"):
        sym = name.split()[-1]
        if "[k]" not in name:
            continue
        for prefix in ("__x64_sys_", "__do_sys_", "ksys_"):
            if sym.startswith(prefix):
                call = sym.removeprefix(prefix)
                calls[call] = max(calls.get(call, 0.0), pct)
        if sym == "__irq_exit_rcu":
            calls["(interrupts, softirqs)"] = pct
    print("# perf: kernel time by system call (inclusive)")
    for call, pct in sorted(calls.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {pct:5.1f}%  {call}")


LOCK = "/tmp/gatewayd-bench.lock"


def lock_held_by_ancestor(lock: str) -> bool:
    """True when this process runs under `flock LOCK ...` (taking it again would deadlock)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if argv and os.path.basename(argv[0]) == b"flock" and lock.encode() in argv:
            return True
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def install_simulator() -> None:
    """The harness's counter imports gatewayd's EnOS simulator by its old name (`gatewayd.sim.enos`)
    but installs only the daemon's distribution into its venv: put this checkout's sim/ next to
    it (no deps: the daemon's install brings them; the plug-in never clears an existing venv) and
    enable the old name (`gatewayd_sim._alias`) with a .pth line."""
    venv = BASE / "venv-gatewayd"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "aiohttp>=3.10,<4"], check=True, timeout=900)
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(ROOT / "sim")], check=True,
                   timeout=900)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "gatewayd_sim_alias.pth").write_text(
        "import gatewayd_sim._alias; gatewayd_sim._alias.install()\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gateway", choices=["gatewayd", "tbgw"])
    ap.add_argument("preset")
    ap.add_argument("--py-spy", type=Path, help="record the gateway in the window (raw stacks)")
    ap.add_argument("--py-spy-bin", default=str(ROOT / ".venv" / "bin" / "py-spy"))
    ap.add_argument("--py-spy-native", action="store_true",
                    help="with --py-spy: sample C frames too (uvloop, _asyncio, sqlite3); "
                         "pauses the gateway at each sample, so its CPU figures grow")
    ap.add_argument("--py-spy-rate", type=int, default=200,
                    help="with --py-spy: samples per second (default 200; more for a short window)")
    ap.add_argument("--perf", type=Path,
                    help="record every thread of the gateway in the window with `perf record -e "
                         "cpu-clock -g` (kernel and C time too) and print the split")
    ap.add_argument("--no-lock", action="store_true", help="do not take /tmp/gatewayd-bench.lock")
    ap.add_argument("extra", nargs="*", help="more bench.py options (after --)")
    args = ap.parse_args()
    if args.perf and not shutil.which("perf"):
        ap.error("--perf: perf not found (apt-get install linux-perf)")
    if args.py_spy and not Path(args.py_spy_bin).exists():
        ap.error(f"--py-spy: {args.py_spy_bin} not found (install it: .venv/bin/pip install py-spy)")
    cmd = [str(HARNESS / "run.sh"), args.gateway, args.preset, *args.extra]
    if not args.no_lock and not lock_held_by_ancestor(LOCK):
        cmd = ["flock", LOCK, *cmd]
    if args.gateway == "gatewayd":
        install_simulator()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    run_dir: Path | None = None
    scraper: Scraper | None = None
    edges: list[tuple[float, dict[str, float], dict[str, float]]] = []
    threads: list[tuple[float, dict[int, tuple[str, int, int, int, int]]]] = []
    gw_pid: int | None = None
    spy: subprocess.Popen[bytes] | None = None
    perf: subprocess.Popen[bytes] | None = None
    window_s = 60.0
    summary = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = re.search(r"run \d+/\d+: (\S+)", line)
        if m:
            run_dir = BASE / "runs" / m.group(1)
        if "first reading" in line and args.gateway == "gatewayd" and run_dir is not None:
            pid = gateway_pid(run_dir)
            toml = (run_dir / "gatewayd.toml").read_text()
            port = int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', toml).group(1))  # type: ignore[union-attr]
            if pid is not None:
                scraper = Scraper(pid, port)
                gw_pid = pid
        m = re.search(r"window (\d+(?:\.\d+)?)s", line)
        if m:
            window_s = float(m.group(1))
            if scraper is not None:
                edges.append(scraper.scrape())
                if gw_pid is not None:
                    threads.append((time.monotonic(), thread_times(gw_pid)))

                def at_end(s: Scraper = scraper, t0: float = edges[0][0], w: float = window_s,
                           tpid: int | None = gw_pid) -> None:
                    time.sleep(max(0.0, t0 + w - time.time()))
                    edges.append(s.scrape())
                    if tpid is not None:
                        threads.append((time.monotonic(), thread_times(tpid)))

                threading.Thread(target=at_end, daemon=True).start()
            pid: int | None = None  # the gateway process, for the profilers
            if (args.perf or args.py_spy) and run_dir is not None:
                pid = gateway_pid(run_dir) if args.gateway == "gatewayd" else None
                if pid is None:  # tbgw: the launched python
                    out = subprocess.run(["pgrep", "-f", "launch.py"], capture_output=True, text=True)
                    pid = int(out.stdout.split()[0]) if out.stdout.split() else None
            if args.perf and pid is not None:
                perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999",
                                         "-g", "-p", str(pid), "-o", str(args.perf), "--",
                                         "sleep", str(int(window_s) - 5)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if args.py_spy and pid is not None:
                spy = subprocess.Popen([args.py_spy_bin, "record", "-p", str(pid), "-d",
                                        str(int(window_s) - 5), "-r", str(args.py_spy_rate),
                                        # --native needs the process paused per sample
                                        *(["--native"] if args.py_spy_native
                                          else ["--nonblocking"]),
                                        "-f", "raw", "-o", str(args.py_spy)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if " delivered=" in line:
            summary = line.strip()
    rc = proc.wait()
    if spy is not None:
        spy.wait(timeout=120)
        if args.py_spy and args.py_spy.exists():
            summarize_pyspy(args.py_spy)
    if perf is not None:
        perf.wait(timeout=120)
        if args.perf.exists():
            summarize_perf(args.perf)
    if scraper is not None:
        scraper.close()
    if rc or run_dir is None or not summary:
        return rc or 1
    slave = json.loads((run_dir / "slave.json").read_text())["served"]
    rec = [json.loads(x) for x in (BASE / "results.jsonl").read_text().splitlines() if x.strip()][-1]
    if len(edges) == 2:
        (t0, m0, c0), (t1, m1, c1) = edges
        span = t1 - t0
        commits = c1.get("gatewayd_queue_commit_seconds_count", 0) - c0.get(
            "gatewayd_queue_commit_seconds_count", 0)
        queued = c1.get("gatewayd_readings_queued_total", 0) - c0.get("gatewayd_readings_queued_total", 0)
        print(f"# queue commits in the window: {commits / span:.1f}/s, "
              f"{queued / commits if commits else 0:.0f} readings per commit")
    else:
        print("# no /metrics scrape (not gatewayd, or not root): fairness from the slave only")
        t0 = time.time()  # unknown: use the slave log's middle 60 s
        first, last = slave[0][2] / 1000, slave[-1][2] / 1000
        t0 = first + (last - first - window_s) / 2
        t1, m0, m1 = t0 + window_s, {}, {}
    if len(threads) == 2:
        print_thread_times(threads[0][1], threads[1][1], threads[1][0] - threads[0][0])
    units = rec["units"]
    per_unit = collections.Counter(u for u, _, ms in slave if t0 * 1000 <= ms < t1 * 1000)
    counts = [per_unit.get(u, 0) for u in range(1, units + 1)]
    mean = sum(counts) / len(counts)
    spread = (max(counts) - min(counts)) / mean * 100 if mean else 0.0
    print(f"# per-unit polls in the window: min {min(counts)} max {max(counts)} mean {mean:.1f} "
          f"spread {spread:.1f}% (target <= 5%)")
    if m0 and m1:
        expected = round((t1 - t0) * 1000 / rec["period_ms"])
        diffs = []
        for u in range(1, units + 1):
            name = f"unit-{u:03d}"
            ours = m1.get(name, 0) - m0.get(name, 0)
            theirs = max(0, expected - per_unit.get(u, 0))
            diffs.append(ours - theirs)
        total_ours = sum(m1.values()) - sum(m0.values())
        print(f"# missed polls in the window: gatewayd_device_missed_polls_total {total_ours:.0f}, "
              f"harness-style (expected - served per unit) {sum(max(0, expected - c) for c in counts)}; "
              f"per unit difference min {min(diffs):+.0f} max {max(diffs):+.0f} (target within +-1); "
              f"harness summary missed={rec['missed_polls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
