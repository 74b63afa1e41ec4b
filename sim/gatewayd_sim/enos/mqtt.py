"""A compact, strict MQTT 3.1.1 server transport for the EnOS simulator.

It speaks what EnOS devices use: CONNECT/CONNACK, PUBLISH QoS 0 and 1 with PUBACK, SUBSCRIBE/
SUBACK (wildcards), UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP and DISCONNECT. QoS 2 is refused by
closing the connection (EnOS rejects QoS 2). It does not route messages between clients: the
application (`Hub`) decides what each connection receives. Protocol violations close the
connection, as the spec demands.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("gatewayd_sim.enos.mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3)
ACCEPTED = 0
BAD_PROTOCOL = 1
BAD_CLIENT_ID = 2
SERVER_UNAVAILABLE = 3
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5

MAX_PACKET_BYTES = 2 * 1024 * 1024  # a bit above the hub's 512 KB, so 1008 can be answered
CONNECT_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1; the connection is closed."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    client_id: str
    username: str | None
    password: str | None
    keepalive_s: int
    clean_session: bool
    peer_cert_cn: str | None  # CN of a verified TLS client certificate
    tls: bool


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _read_str(buf: memoryview, pos: int) -> tuple[str, int]:
    b, pos = _read_bytes(buf, pos)
    try:
        return b.decode(), pos
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 string") from None


def _read_bytes(buf: memoryview, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(buf):
        raise ProtocolError("truncated length prefix")
    (n,) = struct.unpack_from("!H", buf, pos)
    pos += 2
    if pos + n > len(buf):
        raise ProtocolError("truncated field")
    return bytes(buf[pos:pos + n]), pos + n


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT filter matching with `+` and `#` (no special `$` topics in EnOS)."""
    f_parts, t_parts = filt.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def valid_filter(filt: str) -> bool:
    """True if `filt` is a well-formed MQTT topic filter."""
    if not filt or "\x00" in filt:
        return False
    parts = filt.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return False
        if "+" in p and p != "+":
            return False
    return True


@dataclass(eq=False)
class Connection:
    """One client connection; the application keeps its own per-connection state in `state`."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn_id: int
    tls: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    state: Any = None
    session_present: bool = False  # CONNACK flag: an earlier session was resumed
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _packet_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _wildcards: set[str] = field(default_factory=set)

    @property
    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "?"

    def subscribed(self, topic: str) -> bool:
        """True if one of this connection's filters matches `topic`: a set lookup for the
        exact filters (the SDKs subscribe one `_reply` topic each), then the few wildcards."""
        if topic in self.subscriptions:  # a topic name has no wildcards: an exact filter
            return True
        return any(topic_matches(f, topic) for f in self._wildcards)

    def subscribe(self, filt: str, qos: int) -> None:
        self.subscriptions[filt] = qos
        if "+" in filt or "#" in filt:
            self._wildcards.add(filt)

    def unsubscribe(self, filt: str) -> None:
        self.subscriptions.pop(filt, None)
        self._wildcards.discard(filt)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Queue a PUBLISH to the client (QoS 0 or 1; PUBACKs are accepted and not tracked)."""
        if self.closed.is_set():
            return
        body = bytearray(_utf8(topic))
        header = PUBLISH << 4
        if qos:
            header |= 0x02
            body += struct.pack("!H", (next(self._packet_ids) % 65535) + 1)
        body += payload
        self._write(header, bytes(body))

    def _write(self, header: int, body: bytes) -> None:
        self.writer.write(bytes([header]) + _encode_length(len(body)) + body)

    async def drain(self) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await self.writer.drain()

    def close(self) -> None:
        """Close the socket; the serving task notices and runs the application's cleanup."""
        if not self.closed.is_set():
            self.closed.set()
            self.writer.close()


Authenticate = Callable[[Connection, ConnectRequest], Awaitable[int]]
OnPublish = Callable[[Connection, str, bytes, int], Awaitable[None]]
OnEvent = Callable[[Connection], Awaitable[None]]


class MqttServer:
    """Accepts MQTT 3.1.1 connections and hands CONNECT/PUBLISH to the application callbacks.

    `authenticate` returns a CONNACK code (0 accepts). `on_connected` runs after CONNACK is
    written, `on_publish` for each PUBLISH (before its PUBACK, so replies go out first), and
    `on_closed` once when the connection ends for any reason.
    """

    def __init__(self, authenticate: Authenticate, on_publish: OnPublish,
                 on_connected: OnEvent, on_closed: OnEvent,
                 conn_ids: Iterator[int] | None = None) -> None:
        self._authenticate = authenticate
        self._on_publish = on_publish
        self._on_connected = on_connected
        self._on_closed = on_closed
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = conn_ids or itertools.count(1)  # shared across restarts by the owner
        self.connections: set[Connection] = set()
        self.clamp_keepalive: tuple[int, int] | None = None  # see idle_limit_s

    async def listen(self, host: str, port: int, ssl_ctx: ssl.SSLContext | None = None) -> int:
        """Start listening; returns the bound port (pass 0 for a free one)."""
        server = await asyncio.start_server(
            lambda r, w: self._spawn(r, w, ssl_ctx is not None), host, port, ssl=ssl_ctx,
            limit=MAX_PACKET_BYTES)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        conn = Connection(reader, writer, next(self._ids), tls)
        task = asyncio.get_running_loop().create_task(
            self._serve(conn), name=f"enos-sim-conn[{conn.conn_id}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening, drop every connection and wait for their tasks to end."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _read_packet(self, conn: Connection) -> tuple[int, int, bytes]:
        first = await conn.reader.readexactly(1)
        length, mult = 0, 1
        for _ in range(4):
            (b,) = await conn.reader.readexactly(1)
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET_BYTES:
            raise ProtocolError(f"packet of {length} bytes exceeds {MAX_PACKET_BYTES}")
        body = await conn.reader.readexactly(length) if length else b""
        return first[0] >> 4, first[0] & 0x0F, body

    async def _serve(self, conn: Connection) -> None:
        accepted = False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                ptype, _, body = await self._read_packet(conn)
            if ptype != CONNECT:
                raise ProtocolError("first packet is not CONNECT")
            req = self._parse_connect(conn, body)
            if req is None:
                return
            code = await self._authenticate(conn, req)
            present = 1 if code == ACCEPTED and conn.session_present else 0
            conn._write(CONNACK << 4, bytes([present, code]))
            await conn.drain()
            if code != ACCEPTED:
                return
            accepted = True
            self.connections.add(conn)
            await self._on_connected(conn)
            await self._packet_loop(conn, self.idle_limit_s(req.keepalive_s))
        except (ProtocolError, struct.error, asyncio.IncompleteReadError, ConnectionError,
                TimeoutError, ssl.SSLError) as exc:
            log.debug("sim_connection_closed", conn=conn.conn_id,
                      reason=f"{type(exc).__name__}: {exc}")
        finally:
            self.connections.discard(conn)
            conn.close()
            if accepted:
                await self._on_closed(conn)

    def _parse_connect(self, conn: Connection, body: bytes) -> ConnectRequest | None:
        buf = memoryview(body)
        name, pos = _read_str(buf, 0)
        if pos + 4 > len(buf):
            raise ProtocolError("truncated CONNECT")
        level, flags = buf[pos], buf[pos + 1]
        (keepalive,) = struct.unpack_from("!H", buf, pos + 2)
        pos += 4
        if name != "MQTT" or level != 4:
            conn._write(CONNACK << 4, bytes([0, BAD_PROTOCOL]))
            return None
        if flags & 0x01:
            raise ProtocolError("reserved CONNECT flag set")
        client_id, pos = _read_str(buf, pos)
        if flags & 0x04:  # will topic and message: EnOS never uses them, parse and ignore
            _, pos = _read_str(buf, pos)
            _, pos = _read_bytes(buf, pos)
        username = password = None
        if flags & 0x80:
            username, pos = _read_str(buf, pos)
        if flags & 0x40:
            raw, pos = _read_bytes(buf, pos)
            password = raw.decode(errors="replace")
        cn = None
        if conn.tls:
            cert = conn.writer.get_extra_info("peercert")
            for rdn in (cert or {}).get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        cn = value
        return ConnectRequest(client_id, username, password, keepalive, bool(flags & 0x02), cn,
                              conn.tls)

    def idle_limit_s(self, keepalive_s: int) -> float | None:
        """Seconds of silence after which the connection is dropped: 1.5 keepalive periods
        (MQTT 3.1.1 §3.1.2.10). With `clamp_keepalive`, the period is first brought into the
        hub's range (EnOS: 60-300 s), so keepalive 0 or 600 still gets dropped after 450 s."""
        if self.clamp_keepalive is not None:
            low, high = self.clamp_keepalive
            keepalive_s = min(max(keepalive_s, low), high) if keepalive_s else high
        return keepalive_s * 1.5 if keepalive_s else None

    async def _packet_loop(self, conn: Connection, idle_s: float | None) -> None:
        while True:
            async with asyncio.timeout(idle_s):
                ptype, flags, body = await self._read_packet(conn)
            if ptype == PUBLISH:
                await self._handle_publish(conn, flags, body)
            elif ptype == PUBACK:
                continue
            elif ptype == SUBSCRIBE:
                self._handle_subscribe(conn, flags, body)
            elif ptype == UNSUBSCRIBE:
                self._handle_unsubscribe(conn, flags, body)
            elif ptype == PINGREQ:
                conn._write(PINGRESP << 4, b"")
            elif ptype == DISCONNECT:
                return
            else:
                raise ProtocolError(f"unexpected packet type {ptype}")
            await conn.drain()

    async def _handle_publish(self, conn: Connection, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos > 1:
            raise ProtocolError("QoS 2 is not supported by EnOS")
        buf = memoryview(body)
        topic, pos = _read_str(buf, 0)
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolError(f"invalid publish topic {topic!r}")
        packet_id = None
        if qos:
            if pos + 2 > len(buf):
                raise ProtocolError("truncated PUBLISH")
            (packet_id,) = struct.unpack_from("!H", buf, pos)
            pos += 2
        await self._on_publish(conn, topic, bytes(buf[pos:]), qos)
        if packet_id is not None:
            conn._write(PUBACK << 4, struct.pack("!H", packet_id))

    def _handle_subscribe(self, conn: Connection, flags: int, body: bytes) -> None:
        if flags != 0x02:
            raise ProtocolError("bad SUBSCRIBE flags")
        buf = memoryview(body)
        (packet_id,) = struct.unpack_from("!H", buf, 0)
        pos, granted = 2, bytearray()
        while pos < len(buf):
            filt, pos = _read_str(buf, pos)
            if pos >= len(buf):
                raise ProtocolError("truncated SUBSCRIBE")
            qos = buf[pos] & 0x03
            pos += 1
            if not valid_filter(filt) or qos > 2:
                granted.append(0x80)
                continue
            conn.subscribe(filt, min(qos, 1))
            granted.append(min(qos, 1))
        if not granted:
            raise ProtocolError("SUBSCRIBE without filters")
        conn._write(SUBACK << 4, struct.pack("!H", packet_id) + bytes(granted))

    def _handle_unsubscribe(self, conn: Connection, flags: int, body: bytes) -> None:
        if flags != 0x02:
            raise ProtocolError("bad UNSUBSCRIBE flags")
        buf = memoryview(body)
        (packet_id,) = struct.unpack_from("!H", buf, 0)
        pos = 2
        while pos < len(buf):
            filt, pos = _read_str(buf, pos)
            conn.unsubscribe(filt)
        conn._write(UNSUBACK << 4, struct.pack("!H", packet_id))
