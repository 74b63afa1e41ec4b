"""The on-site status page: `/` (HTML, CSS, JS shipped in this package), `/view.json` and the
live stream `/events` (server-sent events). See `view.py` for what it costs the daemon."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from gatewayd.web.recent import Recent
from gatewayd.web.view import View

if TYPE_CHECKING:
    from gatewayd.service import Gateway

__all__ = ["ASSETS", "Recent", "View", "register"]

# name -> content type; read once from the package (no CDN, no build step)
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def register(app: web.Application, gateway: Gateway, allow_commands: bool) -> View:
    """Add the page's routes to the health server's app."""
    view = View(gateway, allow_commands)
    files = {name: _asset(name) for name in ASSETS}
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}

    def serve(name: str) -> web.Response:
        return web.Response(body=files[name], content_type=ASSETS[name], charset="utf-8",
                            headers=headers)

    async def index(_request: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound()
        return serve(name)

    app.router.add_get("/", index)
    app.router.add_get("/assets/{name}", asset)
    app.router.add_get("/view.json", view.handle_json)
    app.router.add_get("/events", view.handle_events)
    app.on_shutdown.append(view.close)
    return view
