"""Sampling overhead of the drivers: CPU per read with 50 emulated devices at 10 Hz.

Scenarios (each ~12 s, the real `gatewayd.sampler.Sampler` driving the real drivers):
  i2c     10 emulated buses x (2 BME280, 2 SHT3x, 1 ADS1115 with 2 points) = 50 devices
  modbus  5 RS-485 lines (ptys) x 10 units, 4 registers in 2 points each = 50 devices; the
          pymodbus slaves run in a child process, so their CPU is not counted
  line    the TB-GW harness's shape (--scenario line): one line, 20 units x 20 uint16 holding
          registers (one 20-register read per poll), at --rate Hz per device (default 10):
          the sampler and Modbus path's CPU per poll, without the queue and the uplink
Printed: achieved reads/s against the 500/s target, CPU-seconds per 1k reads (process total,
and for I2C without the chip models' own CPU), read latency p50/p99, peak RSS.

Run: .venv/bin/python bench/bench_drivers.py [--seconds N] [--scenario all|i2c|modbus|line]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.ads1115 import ADS1115, ADCPoint, ADS1115Config
from drivers.base import Driver, Reading
from drivers.bme280 import BME280, BME280Config
from drivers.bus import BusManager
from drivers.modbus import ModbusConfig, ModbusDriver, ModbusPoint
from drivers.sht import SHT, SHTConfig
from gatewayd.sampler import Sampler
from gatewayd_sim.hw.i2c import sim_bus

RATE_HZ = 10.0


class Timed(Driver):
    """Wraps a driver to record each read's latency."""

    def __init__(self, inner: Driver, latencies: list[float]) -> None:
        super().__init__(inner.name, inner.config, inner.buses)
        self.inner = inner
        self.latencies = latencies

    async def open(self) -> None:
        await self.inner.open()

    async def read(self) -> list[Reading]:
        t0 = time.perf_counter()
        out = await self.inner.read()
        self.latencies.append(time.perf_counter() - t0)
        return out


class Sink:
    def __init__(self) -> None:
        self.reads = 0
        self.readings = 0

    def submit(self, readings: list[Reading]) -> None:
        self.reads += 1
        self.readings += len(readings)

    def backpressure(self) -> bool:
        return False  # an in-memory counter is never behind


async def measure(name: str, devices: list[Driver], seconds: float, model_cpu: Any = None,
                  rate_hz: float = RATE_HZ) -> dict[str, Any]:
    sink = Sink()
    latencies: list[float] = []
    samplers = [Sampler(Timed(d, latencies), 1 / rate_hz, 2.0, 0.05, 1.0, sink) for d in devices]
    tasks = [asyncio.create_task(s.run(), name=f"sampler[{s.driver.name}]") for s in samplers]
    await asyncio.sleep(2.0)  # warm-up: opens, first reads, caches
    reads0, cpu0, wall0 = sink.reads, time.process_time(), time.monotonic()
    readings0 = sink.readings
    model0 = model_cpu() if model_cpu else 0.0
    lat0 = len(latencies)
    await asyncio.sleep(seconds)
    reads, cpu, wall = sink.reads - reads0, time.process_time() - cpu0, time.monotonic() - wall0
    model = (model_cpu() - model0) if model_cpu else 0.0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(latencies[lat0:])
    failing = sum(1 for s in samplers if s.status.state != "ok")
    result = {
        "scenario": name, "devices": len(devices), "target_reads_s": len(devices) * rate_hz,
        "reads_s": round(reads / wall, 1),
        "cpu_s_per_1k_reads": round(cpu / reads * 1000, 3),
        "cpu_ms_per_read": round(cpu / reads * 1000, 3),
        "cpu_us_per_reading": round(cpu / max(1, sink.readings - readings0) * 1e6, 2),
        "cpu_pct_of_one_core": round(cpu / wall * 100, 1),
        "latency_p50_ms": round(statistics.median(lat) * 1000, 2),
        "latency_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
        "failing_devices": failing,
    }
    if model_cpu:
        result["cpu_ms_per_read_without_chip_models"] = round((cpu - model) / reads * 1000, 3)
    return result


async def i2c_scenario(seconds: float) -> dict[str, Any]:
    buses = BusManager()
    devices: list[Driver] = []
    names = [f"bench-{i}" for i in range(10)]
    for b in names:
        spec = f"sim:{b}"
        devices += [BME280(f"{b}-bme76", BME280Config(bus=spec, address=0x76), buses),
                    BME280(f"{b}-bme77", BME280Config(bus=spec, address=0x77), buses),
                    SHT(f"{b}-sht44", SHTConfig(bus=spec, address=0x44, repeatability="low"), buses),
                    SHT(f"{b}-sht45", SHTConfig(bus=spec, address=0x45, repeatability="low"), buses),
                    ADS1115(f"{b}-ads", ADS1115Config(bus=spec, points={
                        "a0": ADCPoint(channel="0", rate_sps=860),
                        "a1": ADCPoint(channel="1", rate_sps=860)}), buses)]
    try:
        return await measure("i2c", devices, seconds,
                             model_cpu=lambda: sum(sim_bus(n).model_cpu_s for n in names))
    finally:
        await buses.close()


_CHILD = """
import sys, time
from gatewayd_sim.hw.serial import ModbusSlaveSim
sims = [ModbusSlaveSim(units=tuple(range(1, 11))).start() for _ in range(int(sys.argv[1]))]
print(" ".join(s.path for s in sims), flush=True)
sys.stdin.read()
for s in sims:
    s.stop()
"""


ROOT = Path(__file__).resolve().parent.parent


async def modbus_scenario(seconds: float) -> dict[str, Any]:
    root = ROOT
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, "5", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert child.stdout is not None and child.stdin is not None
    paths = (await child.stdout.readline()).decode().split()
    buses = BusManager()
    points = {"power_w": ModbusPoint(address=0, type="float32"),
              "energy_wh": ModbusPoint(address=2, type="uint32", scale=0.1)}
    devices: list[Driver] = [
        ModbusDriver(f"line{li}-u{u}", ModbusConfig(port=p, baudrate=115200, unit=u, points=points,
                                                    request_timeout=0.5), buses)
        for li, p in enumerate(paths) for u in range(1, 11)]
    try:
        return await measure("modbus", devices, seconds)
    finally:
        await buses.close()
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 20)


async def line_scenario(seconds: float, rate_hz: float) -> dict[str, Any]:
    root = ROOT
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD.replace("range(1, 11)", "range(1, 21)"), "1",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert child.stdout is not None and child.stdin is not None
    path = (await child.stdout.readline()).decode().split()[0]
    buses = BusManager()
    points = {f"r{i}": ModbusPoint(address=i) for i in range(20)}
    devices: list[Driver] = [
        ModbusDriver(f"unit-{u:03d}", ModbusConfig(port=path, baudrate=115200, unit=u,
                                                   points=points), buses)
        for u in range(1, 21)]
    try:
        return await measure("line", devices, seconds, rate_hz=rate_hz)
    finally:
        await buses.close()
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 20)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--scenario", choices=["all", "i2c", "modbus", "line"], default="all",
                        help="all: i2c and modbus (the default); line: the TB-GW harness's shape")
    parser.add_argument("--rate", type=float, default=RATE_HZ, help="polls/s per device (line)")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.scenario == "line":
        r = await line_scenario(args.seconds, args.rate)
        print(json.dumps(r))
        print(f"# one line, 20 units x 20 registers at {args.rate:g} Hz: {r['reads_s']} polls/s, "
              f"{r['cpu_ms_per_read'] * 1000:.0f} us CPU per poll, {r['cpu_us_per_reading']} us "
              f"per reading, {r['cpu_pct_of_one_core']} % of a core (sampler + Modbus, no queue)")
        return
    results = []
    if args.scenario in ("all", "i2c"):
        results.append(await i2c_scenario(args.seconds))
    if args.scenario in ("all", "modbus"):
        results.append(await modbus_scenario(args.seconds))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in results:
        r["peak_rss_mb"] = round(rss_mb, 1)
        print(json.dumps(r))
    if args.scenario != "all":
        return
    print(f"# CPU per read (50 emulated devices at 10 Hz): I2C {results[0]['cpu_ms_per_read']} ms "
          f"({results[0]['cpu_ms_per_read_without_chip_models']} ms without the chip models), "
          f"Modbus RTU {results[1]['cpu_ms_per_read']} ms")


if __name__ == "__main__":
    asyncio.run(main())
