"""`gatewayd probe`: scan and identify on the emulated bus, Modbus and line reads on a pty,
reading a configured device, and readable errors."""

from __future__ import annotations

import argparse
import io
import textwrap
from pathlib import Path

from gatewayd import probe
from gatewayd_sim.hw.chips import ADS1115Chip, BME280Chip, PCF8574Chip, SHTChip
from gatewayd_sim.hw.i2c import SimI2CBus
from gatewayd_sim.hw.serial import LineInstrumentSim, ModbusSlaveSim


def run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    out = io.StringIO()
    rc = probe.run(parser.parse_args(argv), out)
    return rc, out.getvalue()


def test_i2c_scan_identifies_chips(sim: SimI2CBus) -> None:
    sim.attach(0x76, BME280Chip())
    sim.attach(0x44, SHTChip())
    sim.attach(0x48, ADS1115Chip())
    relay = sim.attach(0x20, PCF8574Chip())
    gone = sim.attach(0x45, SHTChip())
    gone.vanish()
    rc, text = run("i2c", "--bus", f"sim:{sim.name}")
    assert rc == 0
    assert f"i2c bus sim:{sim.name}: 4 device(s)" in text
    assert "0x76  BME280 (chip id 0x60)" in text
    assert "0x44  SHT3x (status register with valid CRC)" in text
    assert "0x48  ADS1x15 ADC (config 0x8583)" in text
    assert "0x20  PCF8574 / MCP23017 GPIO expander" in text
    assert relay.writes == []  # type: ignore[attr-defined]  # a scan never switches outputs


def test_i2c_missing_adapter_is_readable() -> None:
    rc, text = run("i2c", "--bus", "/dev/i2c-99")
    assert rc == 1
    assert "/dev/i2c-99 does not exist (enable I2C with raspi-config" in text


def test_modbus_read_and_exception() -> None:
    with ModbusSlaveSim() as sim:
        sim.set_values(1, "holding", 0, [123, 0xBEEF])  # type: ignore[attr-defined]
        rc, text = run("serial", "--port", sim.path, "--baud", "19200", "--modbus", "--unit", "1",
                       "--register", "0", "--count", "2")
        assert rc == 0, text
        assert "0:    123  0x007b" in text and "1:  48879  0xbeef" in text
        rc, text = run("serial", "--port", sim.path, "--baud", "19200", "--modbus", "--register", "9999")
        assert rc == 1 and "exception 2: illegal data address" in text
        sim.fault = "silence"
        rc, text = run("serial", "--port", sim.path, "--baud", "19200", "--modbus", "--timeout", "0.2")
        assert rc == 1 and "no answer: check unit id" in text


def test_raw_lines_with_poll() -> None:
    with LineInstrumentSim(poll="READ") as sim:
        rc, text = run("serial", "--port", sim.path, "--lines", "2", "--poll", "READ\\r")
        assert rc == 0
        assert text.count("'T=21.50 H=40.0 ST=OK\\r\\n'") == 2


def test_device_read_from_config(tmp_path: Path, sim: SimI2CBus) -> None:
    sim.attach(0x77, BME280Chip())
    cfg = tmp_path / "gatewayd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [gateway]
        id = "site"
        [[devices]]
        name = "attic"
        driver = "bme280"
        bus = "sim:{sim.name}"
        address = 0x77
    """))
    rc, text = run("device", "attic", "-c", str(cfg))
    assert rc == 0, text
    assert "attic (bme280): 3 point(s)" in text and "temperature_c        21.5" in text
    rc, text = run("device", "cellar", "-c", str(cfg))
    assert rc == 1 and "no device named 'cellar'" in text and "(devices: attic)" in text
    cfg.write_text('[gateway]\nid = "x"\n[[devices]]\nname = "a"\ndriver = "bme280"\naddress = 1\n')
    rc, text = run("device", "a", "-c", str(cfg))
    assert rc == 78 and "0x76 or 0x77" in text
