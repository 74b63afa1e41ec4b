"""A real headless Firefox (Debian's firefox-esr), driven over WebDriver BiDi (its built-in
remote protocol: no geckodriver, no Selenium): navigate, evaluate, screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port


def firefox_path() -> str:
    path = shutil.which("firefox-esr") or shutil.which("firefox")
    assert path, "Debian's firefox-esr package is needed (.ci/run installs it)"
    return path


class Firefox:
    def __init__(self, profile: Path, width: int = 1280, height: int = 1100) -> None:
        self.profile = profile
        self.size = (width, height)
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.context = ""

    async def __aenter__(self) -> Firefox:
        self.profile.mkdir(parents=True, exist_ok=True)
        port = free_port()
        with (self.profile.parent / "firefox.log").open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                firefox_path(), "--headless", "--no-remote", "--profile", str(self.profile),
                f"--remote-debugging-port={port}", f"--window-size={self.size[0]},{self.size[1]}",
                stdout=asyncio.subprocess.DEVNULL, stderr=err)
        self._session = aiohttp.ClientSession()
        async with asyncio.timeout(60):  # a cold start on a loaded machine; a failure bound only
            while self._ws is None:
                assert self.proc.returncode is None, "firefox exited"
                try:
                    self._ws = await self._session.ws_connect(f"ws://127.0.0.1:{port}/session",
                                                              max_msg_size=0)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)  # its remote agent is not listening yet
        await self.send("session.new", capabilities={})
        tree = await self.send("browsingContext.getTree")
        self.context = tree["contexts"][0]["context"]
        return self

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        i = next(self._ids)
        await self._ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        async with asyncio.timeout(30):
            while True:
                msg = await self._ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                data = json.loads(msg.data)
                if data.get("id") == i:
                    assert data.get("type") == "success", data
                    return dict(data["result"])

    async def goto(self, url: str) -> None:
        await self.send("browsingContext.navigate", context=self.context, url=url, wait="complete")

    async def evaluate(self, expression: str) -> Any:
        r = await self.send("script.evaluate", expression=expression, awaitPromise=False,
                            target={"context": self.context})
        assert r["type"] == "success", r
        return r["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30.0) -> Any:
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
        r = await self.send("browsingContext.captureScreenshot", context=self.context)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(r["data"]))
        return path

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
