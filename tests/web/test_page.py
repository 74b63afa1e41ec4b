"""The status page in a real headless Chromium, against a running daemon."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from pathlib import Path

from tests.web.bidi import Firefox
from tests.web.cdp import Browser
from tests.web.conftest import Bench

SCREENSHOT_COPY = os.environ.get("GATEWAYD_SCREENSHOT_TO")  # e.g. docs/status-page.png


async def test_page_shows_every_device_and_uplink_live(bench: Bench, tmp_path: Path) -> None:
    async with Browser(tmp_path / "chromium") as b:
        await b.goto(bench.url + "/")
        await b.wait_for("document.getElementById('conn')?.textContent === 'live'")
        # every configured device and uplink, each with its state
        states = await b.wait_for(f"""(() => {{
            const s = {{}};
            document.querySelectorAll('[data-device]').forEach(e => s[e.dataset.device] = e.dataset.state);
            return Object.keys(s).length === {len(bench.devices)} && !Object.values(s).includes('starting') ? s : null;
        }})()""")
        assert set(states) == set(bench.devices)
        assert states["broken-meter"] == "failing"
        assert states["boiler"] == "ok"
        uplinks = await b.wait_for("""(() => {
            const s = {};
            document.querySelectorAll('tr[data-uplink]').forEach(e => s[e.dataset.uplink] =
                [e.dataset.state, e.querySelector('.badge').textContent, e.lastChild.textContent]);
            return Object.keys(s).length === 2 && s.opshub[0] !== 'starting' && s.opshub[2] ? s : null;
        })()""")
        assert uplinks["archive"][:2] == ["connected", "connected"]
        assert uplinks["opshub"][0] != "connected" and uplinks["opshub"][2]  # its error is shown
        # the failing device shows its error
        err = await b.evaluate("document.querySelector('[data-error=\"broken-meter\"]').textContent")
        assert "simulated fault" in err
        # a value changes without a reload (the marker survives only in the same document)
        await b.evaluate("window.__sameDocument = 42")
        sel = "document.querySelector('[data-point=\"boiler/temperature_c\"]')"
        first = await b.wait_for(f"{sel} && {sel}.dataset.ts")
        second = await b.wait_for(f"{sel}.dataset.ts !== '{first}' && [{sel}.dataset.ts, {sel}.textContent]")
        assert int(second[0]) > int(first)
        assert second[1].endswith(" °C")
        assert await b.evaluate("window.__sameDocument") == 42
        # an emulated I2C chip's values, with units, and a sparkline drawn for it
        attic = await b.wait_for("document.querySelector('[data-point=\"attic-env/temperature_c\"]')?.textContent")
        assert attic.endswith(" °C")
        await b.wait_for("document.querySelector('[data-device=\"boiler\"] svg.spark path')?.getAttribute('d')")
        # an actuator's last command, its result and latency
        body = json.dumps({"action": "set_relay", "params": {"channel": 1, "on": True}}).encode()
        req = urllib.request.Request(bench.url + "/commands", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=30).read()))
        assert reply["ok"], reply
        row = await b.wait_for("""(() => { const r = document.querySelector('tr[data-actuator="relays"]');
            return r && r.textContent.includes('set_relay') ? Array.from(r.cells, c => c.textContent) : null; })()""")
        assert row[1] == "set_relay (local)" and row[2] == "ok" and row[3].endswith(" ms")
        queue = await b.evaluate("document.querySelector('[data-storage]').dataset.storage")
        assert queue == "ok"
        if SCREENSHOT_COPY:  # for docs/: let the sparklines grow first (the test needs no wait)
            await b.wait_for(f"(Number({sel}.dataset.ts) > {first} + 25000)", within=60)
        shot = await b.screenshot(tmp_path / "status-page.png")
        # the page's command form (shown: allow_commands = true) goes through the command map
        assert await b.evaluate("document.getElementById('cmd').hidden") is False
        await b.evaluate("""(() => { const f = document.getElementById('cmdform');
            f.action.value = 'set_relay'; f.params.value = '{"channel": 4, "on": true}';
            f.requestSubmit(); })()""")
        result = await b.wait_for("document.getElementById('cmdresult').textContent.startsWith('200') && "
                                  "document.getElementById('cmdresult').textContent")
        assert '"ok": true' in result
        await b.evaluate("""(() => { const f = document.getElementById('cmdform');
            f.params.value = '{"channel": 99, "on": true}'; f.requestSubmit(); })()""")
        refused = await b.wait_for("document.getElementById('cmdresult').textContent.startsWith('422') && "
                                   "document.getElementById('cmdresult').textContent")
        assert '"code": 400' in refused  # out of the mapped range: refused, never executed
        # a phone: the same page fits its width (wide tables scroll inside their own box)
        await b.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                     mobile=True)
        await b.send("Emulation.setUserAgentOverride",
                     userAgent="Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
                               "(KHTML, like Gecko) Chrome/156.0 Mobile Safari/537.36")
        await b.goto(bench.url + "/")
        await b.wait_for("document.querySelectorAll('[data-device]').length > 0")
        fits = await b.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert fits[0] <= fits[1], fits
        await b.screenshot(tmp_path / "status-page-phone.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if SCREENSHOT_COPY:
        shutil.copy(shot, SCREENSHOT_COPY)


async def test_page_reconnects_after_daemon_restart(bench: Bench, tmp_path: Path) -> None:
    async with Browser(tmp_path / "chromium") as b:
        await b.goto(bench.url + "/")
        await b.wait_for("document.getElementById('conn')?.textContent === 'live'")
        await b.evaluate("window.__sameDocument = 7")
        assert bench.daemon.stop() == 0
        await b.wait_for("document.getElementById('conn')?.textContent === 'reconnecting…'")
        bench.daemon.start()
        bench.daemon.event("gateway_ready", timeout=60)
        await b.wait_for("document.getElementById('conn')?.textContent === 'live'", within=60)
        assert await b.evaluate("window.__sameDocument") == 7
        reads = await b.wait_for("""(() => { const e = document.querySelector('[data-device="boiler"] .muted:last-child');
            return e && e.textContent; })()""")
        assert "reads" in reads


async def test_page_in_firefox(bench: Bench, tmp_path: Path) -> None:
    """The same page in Firefox: states, the failing device's error, a live value change."""
    async with Firefox(tmp_path / "firefox") as b:
        await b.goto(bench.url + "/")
        await b.wait_for("document.getElementById('conn').textContent === 'live'")
        states = json.loads(await b.wait_for(f"""(() => {{
            const s = {{}};
            document.querySelectorAll('[data-device]').forEach(e => s[e.dataset.device] = e.dataset.state);
            return Object.keys(s).length === {len(bench.devices)} && !Object.values(s).includes('starting')
                ? JSON.stringify(s) : null;
        }})()"""))
        assert set(states) == set(bench.devices) and states["broken-meter"] == "failing"
        assert "simulated fault" in await b.evaluate(
            "document.querySelector('[data-error=\"broken-meter\"]').textContent")
        assert await b.evaluate("document.querySelectorAll('tr[data-uplink]').length") == 2
        await b.evaluate("window.__sameDocument = 5")
        sel = "document.querySelector('[data-point=\"boiler/temperature_c\"]')"
        first = await b.wait_for(f"{sel} && {sel}.dataset.ts")
        assert await b.wait_for(f"{sel}.dataset.ts !== '{first}'")
        assert await b.evaluate("window.__sameDocument") == 5
        shot = await b.screenshot(tmp_path / "status-page-firefox.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assets_are_small_and_local(bench: Bench) -> None:
    total = 0
    with urllib.request.urlopen(bench.url + "/", timeout=10) as r:
        html = r.read().decode()
    total += len(html.encode())
    for asset in ("assets/app.js", "assets/app.css"):
        assert asset in html
        with urllib.request.urlopen(f"{bench.url}/{asset}", timeout=10) as r:
            total += len(r.read())
    assert "http://" not in html and "https://" not in html  # no CDN
    assert total < 60 * 1024, total
    with urllib.request.urlopen(bench.url + "/view.json?history=0", timeout=10) as r:
        view = json.loads(r.read())
    assert "series" not in json.dumps(view)
