"""Fleet bench: N gateways against one simulator set (EnOS, HCP IoT MMS, Operations Hub).

    flock /tmp/gatewayd-bench.lock .venv/bin/python bench/fleet/fleet.py [--n 10 50] [--seconds 30]

Each simulator runs in its own process (`gatewayd sim ...`), so its CPU is its own. Each gateway
is a `gatewayd run` process with its own identity, derived from its ordinal i: gateway id
`fleet-gw-i`, EnOS gateway device `fleet-gw-i` with sub-devices `fleet-gw-i-m1`/`-m2`, MMS
device `fleet-gw-i` with its own token, Operations Hub gateway `02-00-00-00-HH-LL`. Its two
sub-devices (BME280 and SHT3x register emulations on its own `sim:` I2C bus) are sampled every
`--interval`, and all three uplinks deliver every reading.

For each N it measures, over a window after every gateway is connected and the backlog is gone:
per-gateway CPU (% of one core) and RSS, each simulator's CPU and accepted readings/s against
what the gateways offer. A simulator is one asyncio process: one core is its ceiling, so the N
at which it becomes the limit is projected as N x 100 % / (its CPU %); the bench also reports a
simulator as the limit outright when it accepts clearly less than is offered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
OPSHUB_USER, OPSHUB_PW = "FLEET", "fleet-pw"
POINTS_PER_CYCLE = 5  # BME280: 3 points, SHT3x: 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB / 1024


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


@dataclass
class Sims:
    enos: subprocess.Popen[bytes]
    mms: subprocess.Popen[bytes]
    opshub: subprocess.Popen[bytes]
    enos_port: int
    enos_http: int
    mms_port: int
    opshub_port: int

    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return {"enos": self.enos, "mms": self.mms, "opshub": self.opshub}

    def accepted(self) -> dict[str, int]:
        """Readings each simulator has accepted so far."""
        c = get_json(f"http://127.0.0.1:{self.enos_http}/stats")["counts"]
        mms = get_json(f"http://127.0.0.1:{self.mms_port}/sim/rows/m0t0y0p0e1?limit=0")["count"]
        ops = get_json(f"http://127.0.0.1:{self.opshub_port}/sim/stats")["rows_total"]
        return {"enos": int(c.get("points_post", 0)) + int(c.get("points_resume", 0)),
                "mms": int(mms), "opshub": int(ops)}


def identity(i: int) -> dict[str, str]:
    return {"gw": f"fleet-gw-{i}", "secret": f"gw-secret-{i}", "m1": f"fleet-gw-{i}-m1",
            "m2": f"fleet-gw-{i}-m2", "token": f"fleet-token-{i:04d}-0123456789abcdef",
            "opshub_id": f"02-00-00-00-{i // 256:02x}-{i % 256:02x}"}


def start_sims(n: int, work: Path, log: Any) -> Sims:
    reg = ['[products.FLEETGW]\nsecret = "fleet-gw-product"\n',
           '[products.FLEETMETER]\nsecret = "fleet-meter-product"\n']
    mms_devices = []
    for i in range(n):
        ident = identity(i)
        reg.append(f'[[devices]]\nproduct_key = "FLEETGW"\ndevice_key = "{ident["gw"]}"\n'
                   f'secret = "{ident["secret"]}"\nnode_type = "gateway"\n'
                   f'sub_devices = ["FLEETMETER/{ident["m1"]}", "FLEETMETER/{ident["m2"]}"]\n')
        for m in ("m1", "m2"):
            reg.append(f'[[devices]]\nproduct_key = "FLEETMETER"\ndevice_key = "{ident[m]}"\n'
                       f'secret = "{ident[m]}-secret"\nnode_type = "sub"\n')
        mms_devices.append({"id": ident["gw"], "token": ident["token"]})
    (work / "enos.toml").write_text("\n".join(reg))
    (work / "mms.json").write_text(json.dumps({"devices": mms_devices}))
    ports = {k: free_port() for k in ("enos", "enos_http", "mms", "opshub")}
    gw = [sys.executable, "-m", "gatewayd", "sim"]
    kw: dict[str, Any] = {"stdout": log, "stderr": subprocess.STDOUT, "cwd": work}
    enos = subprocess.Popen([*gw, "enos", "--registry", str(work / "enos.toml"), "--port",
                             str(ports["enos"]), "--http-port", str(ports["enos_http"]),
                             "--no-record", "--no-throttle"], **kw)
    mms = subprocess.Popen([*gw, "mms", "--port", str(ports["mms"]), "--registry",
                            str(work / "mms.json"), "--max-rows", "1000"], **kw)
    opshub = subprocess.Popen([*gw, "opshub", "--port", str(ports["opshub"]), "--user",
                               f"{OPSHUB_USER}:{OPSHUB_PW}", "--max-rows", "1000"], **kw)
    sims = Sims(enos, mms, opshub, ports["enos"], ports["enos_http"], ports["mms"], ports["opshub"])
    wait_for("the simulators", lambda: sims.accepted() is not None, procs=sims.procs())
    return sims


def gateway_config(i: int, sims: Sims, interval: str, health_port: int) -> str:
    ident = identity(i)
    return f'''
[gateway]
id = "{ident["gw"]}"
state_dir = "gw-{i}"
stop_timeout = "3s"

[health]
listen = "127.0.0.1:{health_port}"

[log]
level = "warning"

[[devices]]
name = "meter-1"
driver = "bme280"
interval = "{interval}"
bus = "sim:fleet"
address = 0x76

[[devices]]
name = "meter-2"
driver = "sht"
interval = "{interval}"
bus = "sim:fleet"
address = 0x44

[uplinks.enos]
type = "enos"
host = "127.0.0.1"
port = {sims.enos_port}
product_key = "FLEETGW"
device_key = "{ident["gw"]}"
device_secret_env = "FLEET_GW_SECRET"
backoff_base = "1s"

[uplinks.enos.devices.meter-1]
product_key = "FLEETMETER"
device_key = "{ident["m1"]}"
device_secret_env = "FLEET_M1_SECRET"

[uplinks.enos.devices.meter-2]
product_key = "FLEETMETER"
device_key = "{ident["m2"]}"
device_secret_env = "FLEET_M2_SECRET"

[uplinks.mms]
type = "mms"
host = "http://127.0.0.1:{sims.mms_port}"
device_id = "{ident["gw"]}"
token_env = "FLEET_MMS_TOKEN"
transport = "ws"

[uplinks.opshub]
type = "opshub"
url = "http://127.0.0.1:{sims.opshub_port}"
allow_http = true
username = "{OPSHUB_USER}"
password_env = "FLEET_OPSHUB_PASSWORD"
gateway_id = "{ident["opshub_id"]}"
'''


def wait_for(what: str, probe: Any, procs: dict[str, subprocess.Popen[bytes]],
             timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.5)  # poll interval while other processes start
    raise TimeoutError(f"waiting for {what}")


def all_connected(ports: list[int]) -> bool:
    for port in ports:
        status = get_json(f"http://127.0.0.1:{port}/status")
        ups = status["uplinks"]
        if any(u["state"] != "connected" or u["backlog"].get("rows", 0) > 50 for u in ups.values()):
            return False
    return True


def sent(ports: list[int]) -> list[dict[str, int]]:
    """Readings each gateway's uplinks report delivered so far."""
    return [{k: int(u.get("sent", 0)) for k, u in get_json(f"http://127.0.0.1:{p}/status")["uplinks"].items()}
            for p in ports]


def run_fleet(n: int, seconds: float, interval_s: float, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "processes.log", "wb")
    sims = start_sims(n, work, log)
    gws: list[subprocess.Popen[bytes]] = []
    health: list[int] = []
    try:
        t_start = time.monotonic()
        for i in range(n):
            ident = identity(i)
            port = free_port()
            cfg = work / f"gw-{i}.toml"
            (work / f"gw-{i}").mkdir(exist_ok=True)
            cfg.write_text(gateway_config(i, sims, f"{interval_s}s", port))
            env = {**os.environ, "FLEET_GW_SECRET": ident["secret"],
                   "FLEET_M1_SECRET": f"{ident['m1']}-secret", "FLEET_M2_SECRET": f"{ident['m2']}-secret",
                   "FLEET_MMS_TOKEN": ident["token"], "FLEET_OPSHUB_PASSWORD": OPSHUB_PW}
            gws.append(subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(cfg)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work))
            health.append(port)
        procs = {**sims.procs(), **{f"gw-{i}": p for i, p in enumerate(gws)}}
        wait_for(f"{n} gateways connected to all three clouds with no backlog",
                 lambda: all_connected(health), procs=procs)
        settle_s = time.monotonic() - t_start
        # the measured window
        s0, a0, t0 = sent(health), sims.accepted(), time.monotonic()
        c0 = {name: cpu_s(p.pid) for name, p in procs.items()}
        time.sleep(seconds)  # the measurement window itself
        a1, t1 = sims.accepted(), time.monotonic()
        c1 = {name: cpu_s(p.pid) for name, p in procs.items()}
        s1 = sent(health)
        rss = {name: rss_mb(p.pid) for name, p in procs.items()}
        dt = t1 - t0
        cpu = {name: 100 * (c1[name] - c0[name]) / dt for name in procs}
        gw_cpu = sorted(cpu[f"gw-{i}"] for i in range(n))
        gw_rss = sorted(rss[f"gw-{i}"] for i in range(n))
        offered = n * POINTS_PER_CYCLE / interval_s
        rates = {k: (a1[k] - a0[k]) / dt for k in a0}
        # gateways that delivered under half their share to some cloud in the window
        share = POINTS_PER_CYCLE / interval_s * dt
        lagging = [f"gw-{i}:{k}={s1[i][k] - s0[i].get(k, 0)}" for i in range(n) for k in s1[i]
                   if s1[i][k] - s0[i].get(k, 0) < share / 2]
        return {"n": n, "settle_s": settle_s, "window_s": dt, "offered": offered, "rates": rates,
                "sim_cpu": {k: cpu[k] for k in ("enos", "mms", "opshub")},
                "sim_rss": {k: rss[k] for k in ("enos", "mms", "opshub")},
                "gw_cpu": gw_cpu, "gw_rss": gw_rss, "lagging": lagging}
    finally:
        for p in gws:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in gws:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in sims.procs().values():
            p.send_signal(signal.SIGINT)
        for p in sims.procs().values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


def report(r: dict[str, Any]) -> str:
    n = r["n"]
    med = r["gw_cpu"][n // 2]
    lines = [f"N = {n} gateways, {r['offered']:.0f} readings/s offered to each cloud "
             f"(all connected, no backlog after {r['settle_s']:.0f} s; window {r['window_s']:.0f} s)",
             f"  per gateway: CPU median {med:.2f} % of a core (min {r['gw_cpu'][0]:.2f}, max "
             f"{r['gw_cpu'][-1]:.2f}); RSS median {r['gw_rss'][n // 2]:.1f} MB (max {r['gw_rss'][-1]:.1f}); "
             f"all gateways {sum(r['gw_cpu']):.0f} % of a core",
             "  simulator   accepted/s   CPU % of a core   RSS MB   projected limit N (100 % of a core)"]
    limits = {}
    for k in ("enos", "mms", "opshub"):
        cpu = r["sim_cpu"][k]
        limits[k] = n * 100 / cpu if cpu > 0 else float("inf")
        lines.append(f"  {k:<10} {r['rates'][k]:>11.0f} {cpu:>17.1f} {r['sim_rss'][k]:>8.0f} "
                     f"{limits[k]:>14.0f}")
    if r["lagging"]:
        lines.append(f"  gateways delivering under half their share: {', '.join(r['lagging'][:10])}")
    short = [k for k in limits if r["rates"][k] < 0.9 * r["offered"]]
    first = min(limits, key=lambda k: limits[k])
    if short:
        lines.append(f"  LIMIT REACHED: {', '.join(short)} accepted under 90 % of the offered rate")
    lines.append(f"  first simulator to saturate: {first}, at about N = {limits[first]:.0f} "
                 f"(gateways then use {limits[first] * med / 100:.1f} cores in all)")
    cores = os.cpu_count() or 1
    n_machine = cores * 100 / med if med > 0 else float("inf")
    who = "the gateways run out of cores first" if n_machine < limits[first] else "a simulator first"
    lines.append(f"  this {cores}-core machine holds about N = {n_machine:.0f} gateways: {who}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50], help="fleet sizes (default 10 50)")
    ap.add_argument("--seconds", type=float, default=30, help="measurement window per size")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval of each device, s")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args()
    print(f"fleet bench: {os.cpu_count()} cores, machine shared with other work; "
          f"each gateway: 2 sub-devices, {POINTS_PER_CYCLE} points every {args.interval:g} s, "
          f"3 uplinks", flush=True)
    with tempfile.TemporaryDirectory(prefix="gatewayd-fleet-") as tmp:
        for n in args.n:
            work = Path(tmp) / f"n{n}"
            r = run_fleet(n, args.seconds, args.interval, work)
            print(report(r), flush=True)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="gatewayd-fleet-kept-"))
            subprocess.run(["cp", "-a", f"{tmp}/.", str(kept)], check=True)
            print(f"work directory kept in {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
