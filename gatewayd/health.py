"""The local HTTP endpoint: /healthz, /metrics (Prometheus), /status (JSON), POST /commands,
and the on-site status page at / (gatewayd.web)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.config import HealthSection
from gatewayd.dispatch import local_command
from gatewayd.httpd import (
    HTTPServer,
    RateLimitedLog,
    Request,
    Response,
    Router,
    error_response,
    json_response,
)
from gatewayd.metrics import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from gatewayd.httpd import Handler
    from gatewayd.service import Gateway
    from gatewayd.web.view import View

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


def _basic_auth(user: str, password: str, handler: Handler) -> Handler:
    import hmac  # only with auth configured: hashlib's OpenSSL parts cost memory otherwise

    expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    async def check(request: Request) -> Response:
        if request.path != "/healthz":  # liveness probes stay open; they show no data
            given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
            if not hmac.compare_digest(given, expected):
                return error_response(401, "authentication required", [
                    ("WWW-Authenticate", 'Basic realm="gatewayd", charset="UTF-8"')])
        return await handler(request)

    return check


def _host_name(value: str) -> str:
    """The host part of a Host header or an Origin's authority, lower-case, without the port."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin_guard(allowed: Iterable[str], handler: Handler) -> Handler:
    """Refuse a state-changing request (anything but GET and HEAD) that a browser sent on
    another site's behalf.

    - DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and POSTs; the
      browser then sends `Host: evil.example:9847`. Accepted Hosts: an IP address, localhost,
      this machine's host name (and name.local), and `[health] allowed_hosts`.
    - Cross-site requests: a form or fetch from another origin carries `Origin`; it must be
      this Host. Clients that send no Origin (curl, scripts) are not browsers acting for a
      page, and pass. GET and HEAD change nothing and pass, so scrapers by any name work.
    """
    host = socket.gethostname().lower()
    names = {"localhost", host, host.partition(".")[0] + ".local", *(a.lower() for a in allowed)}
    refused = RateLimitedLog()  # one line a minute, with the count not logged

    def refuse(request: Request, message: str) -> Response:
        refused.warning("health_request_refused", method=request.method, path=request.path,
                        reason=message, host=request.headers.get("host", "")[:200],
                        origin=request.headers.get("origin", "")[:200])
        return error_response(403, message)

    async def check(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            given = request.headers.get("host", "")
            name = _host_name(given)
            if given and not _is_ip(name) and name not in names:
                return refuse(request, f"Host {name[:100]!r} is not a name of this gateway;"
                                       " add it to [health] allowed_hosts to accept it")
            origin = request.headers.get("origin")
            if origin is not None:
                scheme, sep, authority = origin.strip().lower().partition("://")
                if not sep or scheme not in ("http", "https") or authority != given.strip().lower():
                    return refuse(request, f"cross-origin request refused (Origin {origin[:100]!r}"
                                           f" is not http://{given[:100]})")
        return await handler(request)

    return check


class HealthServer:
    """Serves the gateway's health, metrics and status; optional local command hook."""

    def __init__(self, config: HealthSection, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.port = 0  # the bound port, once serving
        self.started = asyncio.Event()
        self.view: View | None = None

    def app(self) -> Handler:
        """The request handler: the routes, behind basic auth when configured."""
        router = Router()
        router.add("GET", "/healthz", self.healthz)
        router.add("GET", "/readyz", self.readyz)
        router.add("GET", "/metrics", self.metrics)
        router.add("GET", "/status", self.status)
        if self.config.allow_commands:
            router.add("POST", "/commands", self.command)
        from gatewayd import web as status_page

        self.view = status_page.register(router, self.gateway, self.config.allow_commands)
        auth = self.config.auth
        app = _basic_auth(auth.user, auth.password.reveal(), router) if auth else router
        return _origin_guard(self.config.allowed_hosts, app)

    async def serve(self) -> None:
        """Serve until cancelled."""
        server = HTTPServer(self.app(), max_body=COMMAND_MAX_BYTES)
        self.port = await server.start(self.config.host, self.config.port)
        try:
            log.info("health_listening", host=self.config.host, port=self.port)
            self.started.set()
            await asyncio.Event().wait()
        finally:
            if self.view is not None:
                await self.view.close()  # end the event streams first: their clients reconnect
            await server.close()

    async def healthz(self, request: Request) -> Response:
        """Liveness: 200 while the loops run (the body names what is degraded), 503 if one died."""
        dead = self.gateway.dead_loops()
        body = {"ok": not dead, "problems": dead, "degraded": self.gateway.degraded()}
        return json_response(body, status=200 if not dead else 503)

    async def readyz(self, request: Request) -> Response:
        """Readiness: 503 with the reasons while the gateway cannot do its job."""
        reasons = self.gateway.not_ready()
        body = {"ready": not reasons, "reasons": reasons, "degraded": self.gateway.degraded()}
        return json_response(body, status=200 if not reasons else 503)

    async def metrics(self, request: Request) -> Response:
        await self.gateway.refresh_gauges()
        body = generate_latest(self.gateway.metrics.registry)
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    async def status(self, request: Request) -> Response:
        return json_response(await self.gateway.status(),
                             dumps=lambda o: json.dumps(o, default=str, indent=2))

    async def command(self, request: Request) -> Response:
        """One command through the command map (uplink "local"). Bad input of any kind (huge,
        binary, deeply nested, wrong shape) gets a 4xx JSON error, never a traceback."""
        raw = await request.read(COMMAND_MAX_BYTES)  # over it: HTTPError 413
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            return error_response(400, "body is not JSON (UTF-8)")
        except RecursionError:
            return error_response(400, "body nests too deeply")
        shape = 'expected {"action": str, "device": str?, "params": {}?, "id": str?}'
        if not isinstance(body, dict):
            return error_response(400, shape)
        params: Any = body.get("params", {})
        device, cmd_id = body.get("device", ""), body.get("id") or uuid.uuid4().hex
        if not isinstance(body.get("action"), str) or not isinstance(params, dict) \
                or not isinstance(device, str) or not isinstance(cmd_id, str | int) \
                or isinstance(cmd_id, bool):
            return error_response(400, shape)
        if _depth_over(params, COMMAND_MAX_DEPTH):
            return error_response(400, f"params nest deeper than {COMMAND_MAX_DEPTH} levels")
        cmd = local_command(body["action"][:200], device[:200], params, str(cmd_id)[:200])
        result = await self.gateway.dispatcher.execute(cmd)
        return json_response({"id": result.command_id, "ok": result.ok, "code": result.code,
                              "message": result.message, "data": dict(result.data)},
                             status=200 if result.ok else 422)
