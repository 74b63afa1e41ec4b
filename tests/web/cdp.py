"""A real headless Chromium (Debian's package), driven over the DevTools protocol.

`--dump-dom` with `--virtual-time-budget` never finishes on a page that holds a live
EventSource open (virtual time waits for the network to go idle), so the tests talk CDP over
a WebSocket instead: navigate once, evaluate expressions in the page, take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]


def chromium_path() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium package is needed (.ci/run installs it)"
    return path


class Browser:
    """One Chromium process with a fresh profile, and one page in it."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 1600) -> None:
        self.profile = profile
        self.size = (width, height)
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        with (self.profile / "chromium.log").open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                chromium_path(), *FLAGS, f"--user-data-dir={self.profile}",
                f"--window-size={self.size[0]},{self.size[1]}", "--remote-debugging-port=0",
                "about:blank", stdout=subprocess.DEVNULL, stderr=err)
        port_file = self.profile / "DevToolsActivePort"
        async with asyncio.timeout(60):  # a cold start on a loaded machine; a failure bound only
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                assert self.proc.returncode is None, f"chromium exited: {self._log_tail()}"
                await asyncio.sleep(0.05)  # the file appears once DevTools listens
        port = int(port_file.read_text().splitlines()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    def _log_tail(self) -> str:
        p = self.profile / "chromium.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        i = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self._ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        async with asyncio.timeout(30):
            reply = await fut
        assert "error" not in reply, f"{method}: {reply['error']}"
        return dict(reply.get("result", {}))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30.0) -> Any:
        """Evaluate until the result is truthy; returns it. Fails after `timeout` (a bound)."""
        last: Any = None
        try:
            async with asyncio.timeout(within):
                while True:
                    last = await self.evaluate(expression)
                    if last:
                        return last
                    await asyncio.sleep(0.1)  # polling the page's DOM for a condition
        except TimeoutError:
            raise AssertionError(f"page never satisfied {expression!r}; last: {last!r}") from None

    async def screenshot(self, path: Path) -> Path:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(r["data"]))
        return path

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
