"""`gatewayd probe`: commissioning tools a technician runs on site.

  gatewayd probe i2c --bus 1                 scan a bus and identify known chips
  gatewayd probe serial --port P --modbus --unit 1 --register 0 --count 2
                                             one Modbus read
  gatewayd probe serial --port P --lines 5   show raw lines
  gatewayd probe device NAME -c config.toml  read one configured device once

Every failure is printed as one readable sentence (with the usual fix) and exit status 1;
an invalid config exits 78.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

import drivers
from drivers.base import DriverError, Quality, ReadTimeoutError
from drivers.bus import BusManager, I2CBus, RawI2C
from drivers.modbus import _READ_PDU, EXCEPTION_NAMES, ModbusExceptionError
from drivers.sht import check_words

EX_CONFIG = 78

# address -> what usually lives there, for the scan listing
KNOWN_ADDRESSES: dict[int, str] = {
    **{a: "PCF8574 / MCP23017 GPIO expander" for a in range(0x20, 0x28)},
    **{a: "PCF8574A GPIO expander" for a in range(0x38, 0x40)},
    0x44: "SHT3x/SHT4x", 0x45: "SHT3x/SHT4x", 0x46: "SHT4x",
    **{a: "ADS1115 ADC" for a in range(0x48, 0x4C)},
    **{a: "EEPROM" for a in range(0x50, 0x58)},
    0x68: "RTC (DS3231/DS1307)", 0x76: "BME280/BMP280", 0x77: "BME280/BMP280",
}
_BOSCH_IDS = {0x60: "BME280", 0x58: "BMP280", 0x56: "BMP280 (sample)", 0x57: "BMP280 (sample)",
              0x61: "BME680", 0x55: "BMP180"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="probe_command", required=True, metavar="WHAT")
    i2c = sub.add_parser("i2c", help="scan an I2C bus and identify chips")
    i2c.add_argument("--bus", default="1",
                     help='bus number, /dev/i2c-N, or "sim:bench" (the bench\'s emulated chips)')
    ser = sub.add_parser("serial", help="talk to a serial port: one Modbus read, or raw lines")
    ser.add_argument("--port", required=True, help="device path or pyserial URL")
    ser.add_argument("--baud", type=int, default=9600)
    ser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    ser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    ser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    ser.add_argument("--modbus", action="store_true", help="do one Modbus RTU read")
    ser.add_argument("--unit", type=int, default=1)
    ser.add_argument("--register", type=int, default=0, help="0-based protocol address")
    ser.add_argument("--count", type=int, default=1)
    ser.add_argument("--function", choices=["holding", "input", "coil", "discrete"], default="holding")
    ser.add_argument("--lines", type=int, default=5, help="raw lines to show (without --modbus)")
    ser.add_argument("--poll", default="", help="text sent before each line (\\r and \\n escapes)")
    dev = sub.add_parser("device", help="read one configured device once and print its points")
    dev.add_argument("name", help="the device's name in the config")
    dev.add_argument("-c", "--config",
                     default=os.environ.get("GATEWAYD_CONFIG", "/etc/gatewayd/gatewayd.toml"))


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the chosen probe; returns the exit status."""
    out = out or sys.stdout
    commands: dict[str, Callable[[argparse.Namespace, TextIO], Coroutine[Any, Any, int]]] = {
        "i2c": probe_i2c, "serial": probe_serial, "device": probe_device}
    try:
        return asyncio.run(commands[args.probe_command](args, out))
    except DriverError as exc:
        print(f"error: {exc}", file=out)
        return 1
    except KeyboardInterrupt:
        return 130


# --- i2c --------------------------------------------------------------------------------------


def identify(raw: RawI2C, addr: int) -> str:
    """Name the chip at `addr` by its ID register where it has one, without changing outputs.

    Runs in the bus worker thread. Expanders are never written to: a write would switch relays.
    """
    guess = KNOWN_ADDRESSES.get(addr, "unknown device")
    try:
        if addr in (0x76, 0x77):
            chip_id = raw.transfer(addr, b"\xd0", 1)[0]
            return _BOSCH_IDS.get(chip_id, f"unknown Bosch-like chip (id {chip_id:#04x})") + \
                f" (chip id {chip_id:#04x})"
        if addr in (0x44, 0x45, 0x46):
            return _identify_sht(raw, addr)
        if 0x48 <= addr <= 0x4B:
            cfg = int.from_bytes(raw.transfer(addr, b"\x01", 2), "big")
            return f"ADS1x15 ADC (config {cfg:#06x})"
    except (OSError, ValueError):
        return f"{guess} (did not answer the identification read)"
    return guess


def _identify_sht(raw: RawI2C, addr: int) -> str:
    """SHT3x answers its status command (0xF32D, 0x44/0x45 only); an SHT4x NACKs it and is
    recognised by its serial-number command (0x89: two words, each with CRC-8)."""
    if addr != 0x46:
        try:
            raw.transfer(addr, b"\xf3\x2d", 0)
            check_words(raw.transfer(addr, b"", 3))
            return "SHT3x (status register with valid CRC)"
        except (OSError, ValueError):
            pass
    raw.transfer(addr, b"\x89", 0)
    time.sleep(_SHT4X_SERIAL_WAIT_S)
    words = check_words(raw.transfer(addr, b"", 6))
    return f"SHT4x (serial number {(words[0] << 16) | words[1]:#010x}, valid CRC)"


_SHT4X_SERIAL_WAIT_S = 0.002  # datasheet: the serial number is ready within 1 ms


async def probe_i2c(args: argparse.Namespace, out: TextIO) -> int:
    buses = BusManager()
    try:
        try:
            bus = buses.i2c(args.bus)
        except ValueError as exc:  # "sim:" without a name, or the simulators not installed
            print(f"error: {exc}", file=out)
            return 1
        found = []
        for addr in range(0x03, 0x78):
            if await bus.probe(addr):
                found.append(addr)
        if not found and bus.sim is not None:
            print(f"error: {bus.spec} is empty in this process: an emulated bus lives inside one "
                  f"process, and only sim:bench starts populated (with the bench's chips)", file=out)
            return 1
        print(f"i2c bus {bus.spec}: {len(found)} device(s)", file=out)
        for addr in found:
            name = await _identify(bus, addr)
            print(f"  {addr:#04x}  {name}", file=out)
        if not found:
            print("  nothing answered: check wiring, power, pull-ups and the bus number", file=out)
        return 0
    finally:
        await buses.close()


async def _identify(bus: I2CBus, addr: int) -> str:
    return await bus.run(lambda raw: identify(raw, addr), device="probe", what=f"identify {addr:#04x}")


# --- serial -----------------------------------------------------------------------------------


async def probe_serial(args: argparse.Namespace, out: TextIO) -> int:
    buses = BusManager()
    settings: dict[str, Any] = {"baudrate": args.baud, "parity": args.parity, "stopbits": args.stopbits}
    try:
        if args.modbus:
            return await _modbus_read(buses, args, settings, out)
        port = buses.serial(args.port, **settings)
        await port.ensure_open("probe")
        poll = args.poll.encode().decode("unicode_escape").encode("latin-1") if args.poll else b""
        for i in range(args.lines):
            if poll:
                await port.write(poll, "probe")
            try:
                line = await port.read_until(b"\n", args.timeout, "probe")
            except DriverError as exc:
                print(f"line {i + 1}: {exc.message}", file=out)
                return 1
            print(repr(line.decode("latin-1")), file=out)
        return 0
    finally:
        await buses.close()


async def _modbus_read(buses: BusManager, args: argparse.Namespace, settings: dict[str, Any],
                       out: TextIO) -> int:
    line = buses.modbus(args.port, **settings)
    fc = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[args.function]
    pdu = _READ_PDU[fc](address=args.register, count=args.count)
    try:
        await line.port.ensure_open("probe")
    except DriverError as exc:
        print(f"error: {exc.message}", file=out)  # the port itself: no Modbus hint applies
        return 1
    try:
        response = await line.request(args.unit, pdu, device="probe", timeout_s=args.timeout,
                                      retries=0)
    except ModbusExceptionError as exc:
        print(f"unit {args.unit} answered exception {exc.code}: "
              f"{EXCEPTION_NAMES.get(exc.code, 'unknown')}", file=out)
        return 1
    except DriverError as exc:
        stats = line.unit_stats(args.unit)
        if stats.crc_errors:
            hint = " (CRC error: check baud rate, parity and wiring/termination)"
        elif isinstance(exc, ReadTimeoutError):
            hint = " (no answer: check unit id, baud rate, A/B wiring)"
        else:
            hint = ""
        print(f"unit {args.unit}: {exc.message}{hint}", file=out)
        return 1
    values = list(response.bits)[:args.count] if fc <= 2 else list(response.registers)
    print(f"unit {args.unit} {args.function} {args.register}..{args.register + args.count - 1}:", file=out)
    for i, v in enumerate(values):
        shown = str(bool(v)) if fc <= 2 else f"{v:>6}  {v:#06x}"
        print(f"  {args.register + i:>5}: {shown}", file=out)
    return 0


# --- device -----------------------------------------------------------------------------------


async def probe_device(args: argparse.Namespace, out: TextIO) -> int:
    from gatewayd.config import load
    from gatewayd.errors import ConfigError

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"config {args.config} is invalid:\n{exc}", file=out)
        return EX_CONFIG
    found = [d for d in cfg.devices if d.name == args.name]
    if not found:
        names = ", ".join(d.name for d in cfg.devices) or "none"
        print(f"no device named {args.name!r} in {args.config} (devices: {names})", file=out)
        return 1
    d = found[0]
    buses = BusManager()
    driver = drivers.load(drivers.DRIVERS, d.driver)(d.name, d.options, buses)
    try:
        async with asyncio.timeout(d.timeout):
            await driver.open()
            readings = await driver.read()
    except TimeoutError:
        print(f"{d.name}: no answer within {d.timeout:g}s (the device's timeout)", file=out)
        return 1
    finally:
        await driver.close()
        await buses.close()
    print(f"{d.name} ({d.driver}): {len(readings)} point(s)", file=out)
    for r in readings:
        quality = "" if r.quality == Quality.GOOD else f"  [{Quality(r.quality).name}]"
        print(f"  {r.point:<20} {r.value!r}{quality}", file=out)
    stats = getattr(driver, "stats", None)
    if callable(stats):
        print(f"  counters: {stats()}", file=out)
    return 0
