"""The on-site status page: `/` (HTML, CSS, JS shipped in this package), `/view.json` and the
live stream `/events` (server-sent events). See `view.py` for what it costs the daemon."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from gatewayd.httpd import HTTPError, Request, Response, Router
from gatewayd.web.recent import Recent
from gatewayd.web.view import View

if TYPE_CHECKING:
    from gatewayd.service import Gateway

__all__ = ["ASSETS", "Recent", "View", "register"]

# name -> content type; read once from the package (no CDN, no build step)
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def register(router: Router, gateway: Gateway, allow_commands: bool) -> View:
    """Add the page's routes to the health server's router."""
    view = View(gateway, allow_commands)
    files = {name: _asset(name) for name in ASSETS}
    headers = [("Cache-Control", "no-cache"),
               ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")]

    def serve(name: str) -> Response:
        return Response(files[name], content_type=f"{ASSETS[name]}; charset=utf-8", headers=headers)

    async def index(_request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        name = request.match["name"]
        if name not in files or name == "index.html":
            raise HTTPError(404)
        return serve(name)

    router.add("GET", "/", index)
    router.add("GET", "/assets/{name}", asset)
    router.add("GET", "/view.json", view.handle_json)
    router.add("GET", "/events", view.handle_events)
    return view
