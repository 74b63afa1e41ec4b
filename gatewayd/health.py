"""The local HTTP endpoint: /healthz, /metrics (Prometheus), /status (JSON), POST /commands,
and the on-site status page at / (gatewayd.web)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gatewayd.config import HealthSection
from gatewayd.dispatch import local_command

if TYPE_CHECKING:
    from gatewayd.service import Gateway

log = structlog.get_logger("gatewayd.health")

COMMAND_MAX_BYTES = 64 * 1024  # a command is a few hundred bytes; more is an attack or a bug
COMMAND_MAX_DEPTH = 16  # params nesting; a command map takes scalars


def _depth_over(obj: Any, limit: int) -> bool:
    """True if `obj` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = list(o.values())
        if isinstance(o, list):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in o)
    return False


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "code": status, "message": message}, status=status)


def _basic_auth(user: str, password: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path != "/healthz":  # liveness probes stay open; they show no data
            given = request.headers.get("Authorization", "").encode(errors="replace")
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"ok": False, "code": 401, "message": "authentication required"}, status=401,
                    headers={"WWW-Authenticate": 'Basic realm="gatewayd", charset="UTF-8"'})
        return await handler(request)

    return check


class HealthServer:
    """Serves the gateway's health, metrics and status; optional local command hook."""

    def __init__(self, config: HealthSection, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.port = 0  # the bound port, once serving
        self.started = asyncio.Event()

    def app(self) -> web.Application:
        auth = self.config.auth
        app = web.Application(
            middlewares=[_basic_auth(auth.user, auth.password.reveal())] if auth else [])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        if self.config.allow_commands:
            app.router.add_post("/commands", self.command)
        from gatewayd import web as status_page

        status_page.register(app, self.gateway, self.config.allow_commands)
        return app

    async def serve(self) -> None:
        """Serve until cancelled."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.config.port
            log.info("health_listening", host=self.config.host, port=self.port)
            self.started.set()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the loops run (the body names what is degraded), 503 if one died."""
        dead = self.gateway.dead_loops()
        body = {"ok": not dead, "problems": dead, "degraded": self.gateway.degraded()}
        return web.json_response(body, status=200 if not dead else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 503 with the reasons while the gateway cannot do its job."""
        reasons = self.gateway.not_ready()
        body = {"ready": not reasons, "reasons": reasons, "degraded": self.gateway.degraded()}
        return web.json_response(body, status=200 if not reasons else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        await self.gateway.refresh_gauges()
        body = generate_latest(self.gateway.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.gateway.status(),
                                 dumps=lambda o: json.dumps(o, default=str, indent=2))

    async def command(self, request: web.Request) -> web.Response:
        """One command through the command map (uplink "local"). Bad input of any kind (huge,
        binary, deeply nested, wrong shape) gets a 4xx JSON error, never a traceback."""
        if request.content_length is not None and request.content_length > COMMAND_MAX_BYTES:
            return _error(413, f"body over {COMMAND_MAX_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.content.iter_chunked(16384):
            raw += chunk
            if len(raw) > COMMAND_MAX_BYTES:
                return _error(413, f"body over {COMMAND_MAX_BYTES} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            return _error(400, "body is not JSON (UTF-8)")
        except RecursionError:
            return _error(400, "body nests too deeply")
        shape = 'expected {"action": str, "device": str?, "params": {}?, "id": str?}'
        if not isinstance(body, dict):
            return _error(400, shape)
        params: Any = body.get("params", {})
        device, cmd_id = body.get("device", ""), body.get("id") or uuid.uuid4().hex
        if not isinstance(body.get("action"), str) or not isinstance(params, dict) \
                or not isinstance(device, str) or not isinstance(cmd_id, str | int) \
                or isinstance(cmd_id, bool):
            return _error(400, shape)
        if _depth_over(params, COMMAND_MAX_DEPTH):
            return _error(400, f"params nest deeper than {COMMAND_MAX_DEPTH} levels")
        cmd = local_command(body["action"][:200], device[:200], params, str(cmd_id)[:200])
        result = await self.gateway.dispatcher.execute(cmd)
        return web.json_response({"id": result.command_id, "ok": result.ok, "code": result.code,
                                  "message": result.message, "data": dict(result.data)},
                                 status=200 if result.ok else 422)
