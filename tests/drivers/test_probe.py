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


def test_i2c_identifies_sht4x_by_serial_number(sim: SimI2CBus) -> None:
    # an SHT4x NACKs the SHT3x status command; its serial-number command 0x89 identifies it
    sht40 = sim.attach(0x44, SHTChip(variant="sht4x"))
    sht40.serial = 0x0BEEF123  # type: ignore[attr-defined]
    sim.attach(0x46, SHTChip(variant="sht4x"))
    sim.attach(0x45, SHTChip())
    rc, text = run("i2c", "--bus", f"sim:{sim.name}")
    assert rc == 0
    assert "0x44  SHT4x (serial number 0x0beef123, valid CRC)" in text
    assert "0x46  SHT4x (serial number 0x1a2b3c4d, valid CRC)" in text
    assert "0x45  SHT3x (status register with valid CRC)" in text
    assert "did not answer" not in text


def test_i2c_sht4x_with_bad_crc_is_not_identified(sim: SimI2CBus) -> None:
    chip = sim.attach(0x44, SHTChip(variant="sht4x"))
    chip.corrupt_crc = True  # type: ignore[attr-defined]
    rc, text = run("i2c", "--bus", f"sim:{sim.name}")
    assert rc == 0 and "0x44  SHT3x/SHT4x (did not answer the identification read)" in text


def test_i2c_sim_without_name_is_one_sentence() -> None:
    rc, text = run("i2c", "--bus", "sim:")
    assert rc == 1
    assert text.count("\n") == 1 and text.startswith("error: emulated bus needs a name")
    assert "Traceback" not in text


def test_i2c_unpopulated_sim_bus_is_refused(sim: SimI2CBus) -> None:
    rc, text = run("i2c", "--bus", f"sim:{sim.name}")  # empty in this process
    assert rc == 1 and text.count("\n") == 1
    assert "only sim:bench starts populated" in text and "wiring" not in text


def test_i2c_sim_bench_from_a_shell_shows_the_bench_chips(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gatewayd", "probe", "i2c", "--bus", "sim:bench"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "i2c bus sim:bench: 4 device(s)" in proc.stdout
    assert "0x76  BME280 (chip id 0x60)" in proc.stdout
    assert "0x44  SHT3x (status register with valid CRC)" in proc.stdout
    assert "0x48  ADS1x15 ADC" in proc.stdout and "0x20  PCF8574" in proc.stdout


def test_bench_chip_table_matches_the_bench_config() -> None:
    import tomllib

    from gatewayd_sim.hw.bench import BenchEmulation
    from gatewayd_sim.hw.i2c import BENCH_I2C_CHIPS

    cfg = tomllib.loads(BenchEmulation().toml())
    i2c = {e["address"]: e["driver"] for e in cfg["devices"] + cfg["actuators"]
           if e.get("bus") == "sim:bench"}
    driver_of = {"bme280": "bme280", "sht3x": "sht", "ads1115": "ads1115", "pcf8574": "pcf8574"}
    assert i2c == {a: driver_of[m] for a, m in BENCH_I2C_CHIPS.items()}


def test_serial_missing_port_says_missing_not_unit_id() -> None:
    rc, text = run("serial", "--port", "/dev/ttyGATEWAYD-NOPE", "--modbus", "--timeout", "0.2")
    assert rc == 1
    assert "serial port /dev/ttyGATEWAYD-NOPE does not exist" in text
    assert "unit id" not in text and "A/B wiring" not in text


def test_modbus_unit_not_on_the_line_is_no_answer() -> None:
    with ModbusSlaveSim(units=(1,)) as sim:
        rc, text = run("serial", "--port", sim.path, "--baud", "19200", "--modbus", "--unit", "7",
                       "--timeout", "0.3")
        assert rc == 1 and "unit 7" in text and "no answer: check unit id" in text
        assert "exception" not in text
