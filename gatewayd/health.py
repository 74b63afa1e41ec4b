"""The local HTTP endpoint: /healthz, /metrics (Prometheus), /status (JSON), POST /commands."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gatewayd.config import HealthSection
from gatewayd.dispatch import local_command

if TYPE_CHECKING:
    from gatewayd.service import Gateway

log = structlog.get_logger("gatewayd.health")


class HealthServer:
    """Serves the gateway's health, metrics and status; optional local command hook."""

    def __init__(self, config: HealthSection, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.port = 0  # the bound port, once serving
        self.started = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        if self.config.allow_commands:
            app.router.add_post("/commands", self.command)
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
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"ok": False, "code": 400, "message": "body is not JSON"},
                                     status=400)
        params: Any = body.get("params", {}) if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("action"), str) \
                or not isinstance(params, dict):
            return web.json_response(
                {"ok": False, "code": 400,
                 "message": 'expected {"action": str, "device": str?, "params": {}?, "id": str?}'},
                status=400)
        cmd = local_command(body["action"], str(body.get("device", "")), params,
                            str(body.get("id") or uuid.uuid4().hex))
        result = await self.gateway.dispatcher.execute(cmd)
        return web.json_response({"id": result.command_id, "ok": result.ok, "code": result.code,
                                  "message": result.message, "data": dict(result.data)},
                                 status=200 if result.ok else 422)
