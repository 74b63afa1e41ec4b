"""`EnosSimulator`: the EnOS hub on real sockets, with a Python and an HTTP control API."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import structlog
from aiohttp import web

from gatewayd_sim.enos import wire as P
from gatewayd_sim.enos.hub import Accepted, CommandRecord, Hub, HubOptions
from gatewayd_sim.enos.mqtt import MqttServer
from gatewayd_sim.enos.registry import Key, Registry, StateFile
from gatewayd_sim.kit import PortHold, add_fault_routes

log = structlog.get_logger("gatewayd_sim.enos")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Server certificate and key, and the CA that client certificates must chain to."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.ca_file is not None:
            ctx.load_verify_locations(self.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx


class EnosSimulator:
    """A local EnOS hub: `async with EnosSimulator(registry) as sim:`.

    Listens for MQTT on `port` (0: a free one), for MQTT over TLS on `tls_port` when `tls` is
    given, and serves the HTTP control API on `http_port` when it is not None. `restart()`
    drops every connection and listens again on the same ports, as a hub bounce would; the
    registry and the records survive.
    """

    def __init__(self, registry: Registry, *, host: str = "127.0.0.1", port: int = 0,
                 tls: TlsFiles | None = None, tls_port: int = 0, http_port: int | None = None,
                 options: HubOptions | None = None, state_file: Path | None = None) -> None:
        self.state = StateFile(state_file) if state_file is not None else None
        if self.state is not None:
            self.state.load_into(registry)  # the run-time state of an earlier process wins
        self.hub = Hub(registry, options)
        if self.state is not None:
            state = self.state
            self.hub.on_state_change = lambda: state.save(registry)
            state.save(registry)
        self.host = host
        self.port = port
        self.tls = tls
        self.tls_port = tls_port if tls else None
        self.http_port = http_port
        self._server: MqttServer | None = None
        self._conn_ids = itertools.count(1)  # connection ids stay unique across restarts
        self._http: web.AppRunner | None = None
        self._back_online: asyncio.Task[None] | None = None
        self._hold = PortHold(host)  # the ports stay ours while offline (see PortHold)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        if self.http_port is not None:
            self._http = web.AppRunner(self._app())
            await self._http.setup()
            site = web.TCPSite(self._http, self.host, self.http_port)
            await site.start()
            self.http_port = self._http.addresses[0][1]
        log.info("sim_started", host=self.host, port=self.port, tls_port=self.tls_port,
                 http_port=self.http_port)

    async def _listen(self) -> None:
        hub = self.hub
        self._server = MqttServer(hub.authenticate, hub.on_publish, hub.on_connected,
                                  hub.on_closed, self._conn_ids)
        if hub.options.keepalive == "clamp":
            self._server.clamp_keepalive = hub.options.keepalive_range
        self.port = await self._server.listen(self.host, self.port)
        if self.tls is not None:
            self.tls_port = await self._server.listen(self.host, self.tls_port or 0,
                                                      self.tls.context())
        self._hold.release()

    async def stop(self) -> None:
        self._cancel_back_online()
        self._hold.release()
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None

    async def restart(self) -> None:
        """Drop all connections (their sub-device logins go with them) and listen again."""
        await self.go_offline()
        await self.go_online()

    async def go_offline(self) -> None:
        """Stop listening and drop every connection, as an outage would; state is kept."""
        if self._server is not None:
            await self._server.close()
            self._server = None
            for port in (self.port, self.tls_port):
                if port and not await self._hold.hold_soon(port):
                    log.warning("sim_port_not_held", port=port)
        log.info("sim_offline", port=self.port)

    async def offline_for(self, seconds: float) -> None:
        """Go offline now and come back by itself after `seconds`."""
        self._cancel_back_online()
        await self.go_offline()

        async def later() -> None:
            await asyncio.sleep(seconds)
            self._back_online = None
            await self.go_online()

        self._back_online = asyncio.create_task(later(), name="enos-sim-back-online")

    def _cancel_back_online(self) -> None:
        if self._back_online is not None:
            self._back_online.cancel()
            self._back_online = None

    async def go_online(self) -> None:
        """Listen again on the same ports."""
        self._cancel_back_online()
        if self._server is None:
            await self._listen()
        log.info("sim_online", port=self.port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what arrived --------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        return self.hub.registry

    def points(self, how: str | None = None, device_key: str | None = None,
               point: str | None = None) -> list[Accepted]:
        """Accepted points, optionally filtered by "post"/"resume", device key and point."""
        return [a for a in self.hub.points
                if (how is None or a.how == how)
                and (device_key is None or a.device_key == device_key)
                and (point is None or a.point == point)]

    def logged_in(self, gateway: Key) -> set[Key]:
        """Sub-devices logged in through `gateway`'s current connection."""
        conn = self.hub.sessions.get(gateway)
        return set(conn.state.logged_in) if conn is not None else set()

    def online(self, key: Key) -> bool:
        return key in self.hub.sessions

    async def wait_until(self, predicate: Any, timeout_s: float = 10.0) -> None:
        await self.hub.wait_until(predicate, timeout_s)

    # -- commands ------------------------------------------------------------------------------

    def invoke_service(self, key: Key, service: str, params: Any) -> CommandRecord:
        """`thing.service.{service}` to a device or sub-device."""
        return self.hub.send_command(key, P.sys_topic(*key, f"thing/service/{service}"),
                                     f"thing.service.{service}", params)

    def set_measurepoints(self, key: Key, values: dict[str, Any]) -> CommandRecord:
        return self.hub.send_command(key, P.sys_topic(*key, "thing/service/measurepoint/set"),
                                     "thing.service.measurepoint.set", values)

    def get_measurepoints(self, key: Key, names: list[str]) -> CommandRecord:
        return self.hub.send_command(key, P.sys_topic(*key, "thing/service/measurepoint/get"),
                                     "thing.service.measurepoint.get", names)

    def combine(self, gateway: Key, action: str, subs: list[Key]) -> CommandRecord:
        """`combine.enable|disable|delete` for `subs`, to their gateway; updates the registry."""
        if action not in ("enable", "disable", "delete"):
            raise ValueError(f"unknown combine action {action!r}")
        for sub in subs:
            dev = self.registry.devices.get(sub)
            if dev is not None:
                dev.enabled = action == "enable"
            if action != "enable":
                conn = self.hub.sub_owner.pop(sub, None)
                if conn is not None:
                    conn.state.logged_in.discard(sub)
            if action == "delete":
                gw = self.registry.devices.get(gateway)
                if gw is not None:
                    gw.topology.discard(sub)
        self.hub.state_changed()
        params = [{"productKey": pk, "deviceKey": dk} for pk, dk in subs]
        return self.hub.send_command(gateway, P.session_topic(*gateway, f"combine/{action}"),
                                     f"combine.{action}", params)

    def send_raw(self, key: Key, suffix: str, payload: bytes) -> CommandRecord:
        """A raw payload on `/sys/{pk}/{dk}/{suffix}` (malformed-command tests)."""
        return self.hub.send_command(key, P.sys_topic(*key, suffix), "", None, payload=payload)

    async def wait_reply(self, rec: CommandRecord, timeout_s: float = 10.0) -> dict[str, Any]:
        """The device's reply envelope to `rec`. Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            await rec.done.wait()
        assert rec.reply is not None
        return rec.reply

    # -- HTTP control API ----------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stats", self._h_stats)
        app.router.add_get("/points", self._h_points)
        app.router.add_get("/devices", self._h_devices)
        app.router.add_post("/commands", self._h_command)
        app.router.add_get("/commands/{id}", self._h_command_get)
        add_fault_routes(app, self.hub.faults)
        app.router.add_post("/sim/restart", self._h_restart)
        app.router.add_post("/sim/offline", self._h_offline)
        app.router.add_post("/sim/online", self._h_online)
        return app

    async def _h_restart(self, request: web.Request) -> web.Response:
        """Drop every connection and listen again; registry, state and records are kept."""
        await self.restart()
        return web.json_response({"restarted": True, "port": self.port})

    async def _h_offline(self, request: web.Request) -> web.Response:
        """?seconds=N: offline for N seconds, then back by itself; without it, until
        POST /sim/online."""
        raw = request.query.get("seconds")
        if raw is None:
            await self.go_offline()
            return web.json_response({"offline": True, "seconds": None})
        try:
            seconds = float(raw)
            if not 0 <= seconds <= 86_400:
                raise ValueError(raw)
        except ValueError:
            return web.json_response({"error": "seconds must be a number from 0 to 86400"},
                                     status=400)
        await self.offline_for(seconds)
        return web.json_response({"offline": True, "seconds": seconds})

    async def _h_online(self, request: web.Request) -> web.Response:
        await self.go_online()
        return web.json_response({"offline": False, "port": self.port})

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"counts": dict(self.hub.counts),
                                  "connects": len(self.hub.connects),
                                  "online": [f"{pk}/{dk}" for pk, dk in self.hub.sessions]})

    async def _h_points(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        pts = self.points(q.get("how"), q.get("device_key"), q.get("point"))[-limit:]
        return web.json_response([{"productKey": a.product_key, "deviceKey": a.device_key,
                                   "point": a.point, "value": a.value, "quality": a.quality,
                                   "time": a.ts_ms, "how": a.how} for a in pts])

    async def _h_devices(self, request: web.Request) -> web.Response:
        out = []
        for key, dev in self.registry.devices.items():
            out.append({"productKey": key[0], "deviceKey": key[1], "nodeType": dev.node_type,
                        "enabled": dev.enabled, "online": self.hub.owner(key) is not None,
                        "topology": sorted(f"{pk}/{dk}" for pk, dk in dev.topology)})
        return web.json_response(out)

    async def _h_command(self, request: web.Request) -> web.Response:
        """POST {"productKey", "deviceKey", "kind": service|set|get|enable|disable|delete,
        "service", "params", "wait_s"} -> the command id and, if it came in time, the reply."""
        try:
            body = await request.json()
            key = (str(body["productKey"]), str(body["deviceKey"]))
            kind = body.get("kind", "service")
            params = body.get("params", {})
            if kind == "service":
                rec = self.invoke_service(key, str(body["service"]), params)
            elif kind == "set":
                rec = self.set_measurepoints(key, params)
            elif kind == "get":
                rec = self.get_measurepoints(key, params)
            else:
                subs = [(str(s["productKey"]), str(s["deviceKey"])) for s in params]
                rec = self.combine(key, kind, subs)
            wait_s = float(body.get("wait_s", 0))
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        if wait_s > 0:
            try:
                await self.wait_reply(rec, wait_s)
            except TimeoutError:
                pass
        return web.json_response(_command_json(rec))

    async def _h_command_get(self, request: web.Request) -> web.Response:
        rec = self.hub.commands.get(request.match_info["id"])
        if rec is None:
            return web.json_response({"error": "no such command"}, status=404)
        return web.json_response(_command_json(rec))


def _command_json(rec: CommandRecord) -> dict[str, Any]:
    rtt_ms = round((rec.replied_at - rec.sent_at) * 1000, 3) if rec.reply is not None else None
    return {"id": rec.msg_id, "topic": rec.topic, "method": rec.method, "reply": rec.reply,
            "raw_reply": rec.raw_reply.hex() if rec.raw_reply is not None else None,
            "delivered": rec.sent_at > 0, "rtt_ms": rtt_ms}
