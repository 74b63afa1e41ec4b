"""Live first: a 1,000,000-reading backlog drains while live readings flow (issue 11).

For each cloud (EnOS, MMS over WebSocket, Operations Hub; each simulator in its own process):
a child process fills the queue with the backlog (so its readings never count in this
process's RSS); then this process opens the queue, starts the uplink with an unlimited
`backlog_rate`, and produces live readings (200/s in 20-reading commits, as 20 devices sampled
every 100 ms would) while the backlog drains. It prints:
- live latency p50 / p99 / max, from a live reading's commit to the cloud's confirmation of
  the message carrying it (the uplink's BatchSent callback);
- the drain time of the backlog (until the low-water mark passes it), and the same drain with
  `live_first = false` (one lane, strict queue order: today's single cursor), run back to back
  in this session, with their ratio;
- peak RSS of this process (queue + uplink + live producer).

Run: .venv/bin/python bench/bench_live_first.py [--backlog N] [--clouds enos,mms,opshub]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_enos  # noqa: E402
import bench_mms  # noqa: E402
import bench_opshub  # noqa: E402
import structlog  # noqa: E402

from drivers.base import Reading  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402
from gatewayd.schema import Secret  # noqa: E402
from gatewayd.uplinks.base import UplinkContext, UplinkState  # noqa: E402
from gatewayd.uplinks.engine import BatchSent, DeliveryUplink  # noqa: E402

LIVE_PER_COMMIT, LIVE_EVERY_S = 20, 0.1


def readings(cloud: str, start: int, n: int, ts_ms: int) -> list[Reading]:
    if cloud == "enos":
        return bench_enos.readings(start, n, ts_ms)
    if cloud == "mms":
        return bench_mms.make_readings(n, start, ts_ms)
    return bench_opshub.make_readings(start, n, ts_ms)


async def fill(db: Path, cloud: str, n: int) -> None:
    """The child process: queue `n` readings for an uplink that has never connected."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    q = Queue(db, QueueConfig(fsync="normal"), [cloud])
    await q.open()
    task = asyncio.create_task(q.run())
    ts0 = int(time.time() * 1000) - n // 100
    for start in range(0, n, 20_000):
        assert await q.put(readings(cloud, start, min(20_000, n - start), ts0))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await q.close()


class Sim:
    """One cloud simulator in its own process."""

    def __init__(self, cloud: str, tmp: Path) -> None:
        self.cloud, self.tmp = cloud, tmp
        self.proc: Any = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> Sim:
        if self.cloud == "enos":
            reg = self.tmp / "registry.json"
            reg.write_text(json.dumps(bench_enos.registry()))
            self.port = bench_enos.free_port()
            log = (self.tmp / "sim.log").open("wb")
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gatewayd_sim.enos", "--registry", str(reg), "--port",
                str(self.port), "--http-port", str(bench_enos.free_port()), "--no-throttle",
                "--no-record", cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + 20
            while b"enos sim:" not in (self.tmp / "sim.log").read_bytes():
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit("the EnOS simulator did not start")
                await asyncio.sleep(0.05)
        elif self.cloud == "mms":
            self._mms = bench_mms.SimProcess()
            await self._mms.__aenter__()
            self.proc, self.url = self._mms.proc, self._mms.url
        else:
            self.proc, self.url = await bench_opshub.start_simulator()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        await self.proc.wait()

    def uplink(self, ctx: UplinkContext) -> DeliveryUplink:
        if self.cloud == "enos":
            from gatewayd.uplinks.enos import DeviceMapping, EnosConfig, EnosUplink
            devices = {f"meter{i}": DeviceMapping("SUBPK", f"meter-{i:03d}",
                                                  Secret(f"secret-meter-{i:03d}"))
                       for i in range(bench_enos.SUBS)}
            devices["gwself"] = DeviceMapping(gateway=True)
            cfg = EnosConfig(host="127.0.0.1", port=self.port, product_key="GWPK",
                             device_key="gw-bench", device_secret=Secret("gwSecret"),
                             max_message_bytes=512 * 1024, batch_max_points=20_000,
                             max_inflight=8, devices=devices, backoff_base=0.2)
            return EnosUplink("enos", cfg, ctx)
        if self.cloud == "mms":
            from gatewayd.uplinks.mms import MessageMap, MmsConfig, MmsUplink
            from gatewayd_sim.mms import DEFAULT_DEVICE_ID, DEFAULT_TOKEN, RESULT_TYPE
            mcfg = MmsConfig(device_id=DEFAULT_DEVICE_ID, token=Secret(DEFAULT_TOKEN),
                             host=self.url, transport="ws", batch_size=10_000,
                             result_message_type=RESULT_TYPE, poll_interval=5.0,
                             messages=[MessageMap(bench_mms.TYPE, timestamp_format="ms")])
            return MmsUplink("mms", mcfg, ctx)
        from gatewayd.uplinks.opshub import OpsHubUplink
        return OpsHubUplink("opshub", bench_opshub.uplink_config(self.url, 10_000), ctx)


async def case(cloud: str, backlog: int, live_first: bool, tmp: Path) -> dict[str, Any]:
    db = tmp / f"{cloud}-{live_first}.db"
    filler = await asyncio.create_subprocess_exec(sys.executable, __file__, "--fill", str(db), cloud,
                                                  str(backlog))
    assert await filler.wait() == 0
    out: dict[str, Any] = {"cloud": cloud, "live_first": live_first}
    async with Sim(cloud, tmp) as sim:
        queue = Queue(db, QueueConfig(), [cloud])
        await queue.open()
        assert queue.outbox(cloud).pending() == backlog
        ctx = UplinkContext("bench", tmp, queue.outbox(cloud), lambda _c: None,
                            live_first=live_first)
        uplink = sim.uplink(ctx)
        committed: dict[int, float] = {}
        latencies: list[float] = []

        def sent(ev: BatchSent) -> None:
            now = time.monotonic()
            for seq in range(ev.first_seq, ev.last_seq + 1):
                t = committed.pop(seq, None)
                if t is not None:
                    latencies.append(now - t)

        uplink.on_batch_sent.append(sent)
        tasks = [asyncio.create_task(queue.run())]
        stop = asyncio.Event()

        async def produce() -> None:
            n = 0
            while not stop.is_set():
                ok = await queue.put(readings(cloud, backlog + n, LIVE_PER_COMMIT,
                                              int(time.time() * 1000)))
                assert ok
                t = time.monotonic()
                for seq in range(queue.tail - LIVE_PER_COMMIT + 1, queue.tail + 1):
                    committed[seq] = t
                n += LIVE_PER_COMMIT
                await asyncio.sleep(LIVE_EVERY_S)  # the producer's own pace

        try:
            t0 = time.perf_counter()
            tasks.append(asyncio.create_task(uplink.run()))
            await uplink.wait_for_state(UplinkState.CONNECTED, timeout_s=30)
            tasks.append(asyncio.create_task(produce()))
            ob = queue.outbox(cloud)
            async with asyncio.timeout(600):
                while ob.acked < backlog:
                    await asyncio.sleep(0.01)  # a bench probe, not a test synchronisation
            out["drain_s"] = time.perf_counter() - t0
            stop.set()
            async with asyncio.timeout(60):
                while ob.acked < queue.tail:
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            for t in reversed(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await queue.close()
    lat = sorted(latencies)
    out["live_n"] = len(lat)
    if lat:
        out["p50_ms"] = lat[len(lat) // 2] * 1000
        out["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        out["max_ms"] = lat[-1] * 1000
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def daemon_toml(tmp: Path, port: int) -> Path:
    """`gatewayd run` as on a Pi: 20 meters at 10 Hz (200 readings/s) and the EnOS uplink."""
    lines = [f'[gateway]\nid = "bench"\nstate_dir = "{tmp / "state"}"\n',
             '[health]\nenabled = false\n', '[log]\nformat = "json"\n']
    for i in range(bench_enos.SUBS):
        lines.append(f'[[devices]]\nname = "meter{i}"\ndriver = "sim"\ninterval = "100ms"\n'
                     f'points.voltage = {{ shape = "sine", min = 220, max = 240, period = "60s" }}\n')
    lines.append('[[devices]]\nname = "gwself"\ndriver = "sim"\ninterval = "1s"\n'
                 'points.freq = { shape = "sine", min = 49, max = 51, period = "60s" }\n')
    lines.append(f'[uplinks.enos]\ntype = "enos"\nhost = "127.0.0.1"\nport = {port}\n'
                 'tls = false\nproduct_key = "GWPK"\ndevice_key = "gw-bench"\n'
                 'device_secret = "gwSecret"\nmax_message_bytes = "512KiB"\n')
    for i in range(bench_enos.SUBS):
        lines.append(f'[uplinks.enos.devices.meter{i}]\nproduct_key = "SUBPK"\n'
                     f'device_key = "meter-{i:03d}"\ndevice_secret = "secret-meter-{i:03d}"\n')
    lines.append('[uplinks.enos.devices.gwself]\ngateway = true\n')
    cfg = tmp / "gatewayd.toml"
    cfg.write_text("\n".join(lines))
    return cfg


def vm_hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))


async def daemon_case(backlog: int) -> dict[str, Any]:
    """The daemon's own peak RSS and drain time: `gatewayd run` drains the backlog to the EnOS
    simulator while its 20 sensors keep sampling."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-first-daemon-"))
    (tmp / "state").mkdir()
    filler = await asyncio.create_subprocess_exec(sys.executable, __file__, "--fill",
                                                  str(tmp / "state" / "queue.db"), "enos",
                                                  str(backlog))
    assert await filler.wait() == 0
    async with Sim("enos", tmp) as sim:
        cfg = daemon_toml(tmp, sim.port)
        log = (tmp / "daemon.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd", "run", "-c", str(cfg), cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        events: dict[str, float] = {}
        try:
            async with asyncio.timeout(600):
                while "backlog_drained" not in events:
                    await asyncio.sleep(0.05)  # reading the daemon's log, a bench probe
                    if proc.returncode is not None:
                        raise SystemExit(f"gatewayd exited; see {tmp / 'daemon.log'}")
                    for line in (tmp / "daemon.log").read_text().splitlines():
                        if line.startswith("{"):
                            ev = json.loads(line)
                            if ev.get("event") in ("backlog_drain_started", "backlog_drained"):
                                events.setdefault(ev["event"], float(ev.get("took_s", 0)))
                                if ev["event"] == "backlog_drained":
                                    events["rows"] = float(ev["rows"])
            hwm = vm_hwm_kb(proc.pid)
        finally:
            proc.terminate()
            await proc.wait()
    return {"drain_s": events["backlog_drained"], "rows": events["rows"], "rss_mb": hwm / 1024}


def main(args: argparse.Namespace) -> int:
    ok = True
    for cloud in args.clouds.split(","):
        # Each cloud in a fresh process, so one cloud's peak RSS never shows in another's.
        r = subprocess.run([sys.executable, __file__, "--one", cloud, "--backlog",
                            str(args.backlog)], capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        if r.returncode:
            sys.stderr.write(r.stderr[-3000:])
            ok = False
    if "enos" in args.clouds.split(","):
        d = asyncio.run(daemon_case(args.backlog))
        good = d["rss_mb"] <= 60
        print(f"enos, `gatewayd run` (20 meters at 10 Hz beside the drain): {d['rows']:,.0f} "
              f"backlog readings drained in {d['drain_s']:.1f} s; daemon peak RSS (VmHWM) "
              f"{d['rss_mb']:.1f} MB (target <= 60 MB: {'met' if good else 'NOT met'})")
        ok = ok and good
    return 0 if ok else 1


async def one(cloud: str, backlog: int) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-live-first-{cloud}-"))
    lf = await case(cloud, backlog, True, tmp)
    single = await case(cloud, backlog, False, tmp)
    print(f"{cloud}: {backlog:,} backlog, live first: drained in {lf['drain_s']:.2f} s "
          f"({backlog / lf['drain_s']:,.0f}/s); live ({lf['live_n']} readings, 200/s) "
          f"commit->cloud p50 {lf['p50_ms']:.0f} ms, p99 {lf['p99_ms']:.0f} ms, "
          f"max {lf['max_ms']:.0f} ms; peak RSS {lf['rss_mb']:.1f} MB")
    print(f"{cloud}: single lane (live_first = false), same session: drained in "
          f"{single['drain_s']:.2f} s; live p50 {single.get('p50_ms', 0):.0f} ms, p99 "
          f"{single.get('p99_ms', 0):.0f} ms; drain ratio live-first/single "
          f"{lf['drain_s'] / single['drain_s']:.2f} (target <= 1.2); peak RSS "
          f"{single['rss_mb']:.1f} MB")
    good = lf["p99_ms"] <= 1000 and lf["drain_s"] <= 1.2 * single["drain_s"] and lf["rss_mb"] <= 60
    print(f"{cloud}: targets (live p99 <= 1 s, drain <= 1.2x single, RSS <= 60 MB): "
          f"{'met' if good else 'NOT met'}")
    return 0 if good else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--clouds", default="enos,mms,opshub")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--fill", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fill:
        asyncio.run(fill(Path(a.fill[0]), a.fill[1], int(a.fill[2])))
    elif a.one:
        raise SystemExit(asyncio.run(one(a.one, a.backlog)))
    else:
        raise SystemExit(main(a))
