"""`gatewayd run` with an EnOS uplink against the simulator: the whole daemon, end to end."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from gatewayd_sim.enos import EnosSimulator
from tests.conftest import Daemon
from tests.enos.conftest import GW, SECRETS, SUBS


async def test_daemon_posts_to_enos_and_switches_a_relay(sim: EnosSimulator, tmp_path: Path,
                                                         daemons: list[Daemon]) -> None:
    for name, secret in SECRETS.items():
        (tmp_path / f"{name}.secret").write_text(secret + "\n")
    config = tmp_path / "gatewayd.toml"
    config.write_text(textwrap.dedent(f"""
        [gateway]
        id = "pi-test"
        state_dir = "state"
        stop_timeout = "5s"

        [health]
        enabled = false

        [log]
        format = "json"

        [[devices]]
        name = "meter1"
        driver = "sim"
        interval = "50ms"
        points.value = {{ shape = "ramp", min = 0, max = 100, period = "10s" }}

        [[actuators]]
        name = "relay"
        driver = "log"

        [uplinks.enos]
        type = "enos"
        host = "127.0.0.1"
        port = {sim.port}
        product_key = "{GW[0]}"
        device_key = "{GW[1]}"
        device_secret_file = "gw-001.secret"
        backoff_base = "100ms"
        devices.meter1 = {{ product_key = "{SUBS['meter1'][0]}", device_key = "meter-001", device_secret_file = "meter-001.secret", points = {{ value = "temp" }} }}
        devices.relay = {{ product_key = "{SUBS['relay'][0]}", device_key = "relay-001", device_secret_file = "relay-001.secret" }}

        [[commands]]
        uplink = "enos"
        action = "switch"
        device = "relay"
        actuator = "relay"
        params.on = {{ type = "bool" }}
        """))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    daemons.append(daemon)
    await sim.wait_until(lambda: len(sim.points(device_key="meter-001", point="temp")) >= 10,
                         timeout_s=30)
    assert sim.logged_in(GW) == {SUBS["meter1"], SUBS["relay"]}
    reply = await sim.wait_reply(sim.invoke_service(SUBS["relay"], "switch", {"on": "true"}))
    assert reply["code"] == 200 and reply["data"]["applied"] == "switch"
    assert await asyncio.to_thread(daemon.stop) == 0
    assert any(e.get("event") == "enos_connected" for e in daemon.events)
    assert not any(SECRETS["gw-001"] in str(e) for e in daemon.events)  # secrets never logged
