"""A small HTTP/1.1 server on asyncio streams, for the local health and status endpoints.

Why not aiohttp: it costs a daemon whose uplinks do not need it about 10 MB of resident memory,
a quarter of its budget, for a handful of local routes. This server does what those routes need
and refuses the rest clearly:
- keep-alive (HTTP/1.1 by default, HTTP/1.0 on request) and pipelining, `Connection: close`;
- request bodies by Content-Length or chunked, read only when the handler asks, with a cap
  (413), and `Expect: 100-continue`;
- limits: request line (414), header block and header count (431), concurrent connections
  (503), a header-read and body-read timeout (408), a write timeout, an idle keep-alive timeout;
- HEAD on every GET route (headers only);
- streaming replies (server-sent events) that end when the client goes away;
- every error is a JSON reply `{"ok": false, "code": N, "message": ...}`; bad clients are
  logged at most once a minute per kind, with a count of what was not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import structlog

log = structlog.get_logger("gatewayd.httpd")

MAX_LINE = 8 * 1024  # request line; longer gets 414
MAX_HEAD = 16 * 1024  # request line and headers; longer gets 431
MAX_HEADERS = 100
MAX_BODY = 64 * 1024  # default cap on a request body; a handler may ask for less
MAX_CONNECTIONS = 64  # the status page's event streams (32) plus probes and scrapes
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection with no request in flight
REQUEST_TIMEOUT_S = 10.0  # from a request's first byte to its last header; and for its body
WRITE_TIMEOUT_S = 30.0  # a reply (or one event) the client does not take in this time
LOG_EVERY_S = 60.0
# Closing a socket with unread input makes the kernel send a reset, and the client may lose
# the reply it was sent (a 413 to a body it is still sending): after an error reply, read and
# discard what still comes, for a bounded time, before closing ("lingering close").
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")


class HTTPError(Exception):
    """An error reply: raise it from a handler (or the server raises it) to answer with it."""

    def __init__(self, status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message or _phrase(status))
        self.status = status
        self.message = message or _phrase(status)
        self.headers = list(headers)


class _Closed(Exception):
    """The client went away, or a timeout ended the connection quietly."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


Stream = Callable[["BodyWriter"], Awaitable[None]]


class Response:
    """A reply: a status, headers and a body, or a `stream` that writes the body itself (the
    connection closes when it returns)."""

    __slots__ = ("body", "headers", "status", "stream")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str = "text/plain; charset=utf-8",
                 headers: Iterable[tuple[str, str]] = (), stream: Stream | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = [("Content-Type", content_type), *headers]
        self.stream = stream


def json_response(obj: Any, status: int = 200, dumps: Callable[[Any], str] = json.dumps,
                  headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(dumps(obj).encode(), status, "application/json; charset=utf-8", headers)


def error_response(status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()) -> Response:
    """The JSON error reply every failure gets."""
    return json_response({"ok": False, "code": status, "message": message or _phrase(status)},
                         status, headers=headers)


class Request:
    """One parsed request. `read()` reads its body (at most `limit` bytes, else 413)."""

    __slots__ = ("_body", "_conn", "headers", "keep_alive", "match", "method", "path", "query",
                 "target", "version")

    def __init__(self, conn: _Connection, method: str, target: str, version: tuple[int, int],
                 headers: dict[str, str]) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        path, _, query = target.partition("?")
        self.path = unquote(path)
        self.query = dict(parse_qsl(query, keep_blank_values=True))
        self.match: dict[str, str] = {}
        conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self.keep_alive = ("keep-alive" in conn_tokens if version < (1, 1)
                           else "close" not in conn_tokens)
        self._body: bytes | None = None

    async def read(self, limit: int = MAX_BODY) -> bytes:
        if self._body is None:
            self._body = await self._conn.read_body(self, limit)
        return self._body


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Exact paths, and paths whose last segment is a parameter (`/assets/{name}`)."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefix: dict[str, tuple[str, dict[str, Handler]]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        if path.endswith("}"):
            prefix, _, name = path.rpartition("/{")
            self._prefix.setdefault(prefix + "/", (name[:-1], {}))[1][method] = handler
        else:
            self._exact.setdefault(path, {})[method] = handler

    async def __call__(self, request: Request) -> Response:
        methods = self._exact.get(request.path)
        if methods is None:
            prefix, _, last = request.path.rpartition("/")
            entry = self._prefix.get(prefix + "/")
            if entry is None or not last:
                raise HTTPError(404)
            request.match[entry[0]] = last
            methods = entry[1]
        method = request.method
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            allow = sorted({*methods, "HEAD"} if "GET" in methods else methods)
            raise HTTPError(405, f"{method} not allowed here", [("Allow", ", ".join(allow))])
        return await handler(request)


class RateLimitedLog:
    """At most one warning per kind per LOG_EVERY_S, with the number not logged since."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, kind: str, level: str = "warning", **kw: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last[kind] = now
            getattr(log, level)(kind, not_logged=self._quiet.pop(kind, 0), **kw)
        else:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1


class BodyWriter:
    """A streaming reply's body: `write` sends at once, and raises ConnectionError if the client
    went away or did not take the bytes within WRITE_TIMEOUT_S."""

    def __init__(self, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self._writer = writer
        self._timeout_s = timeout_s

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("client went away")
        self._writer.write(data)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._writer.drain()
        except TimeoutError as exc:
            raise ConnectionError("client too slow") from exc


class _Connection:
    def __init__(self, server: HTTPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.body_left: int | None = 0  # unread body bytes of the current request; None: chunked
        self.expect_continue = False
        self.linger = False  # closing with input not read: see LINGER_S

    # -- reading ---------------------------------------------------------------------------------

    async def read_head(self) -> bytes | None:
        """The next request's line and headers; None if the client closed or idled out."""
        loop = asyncio.get_running_loop()
        started = False
        try:
            async with asyncio.timeout(self.server.idle_timeout_s) as deadline:
                while True:
                    first = await self.reader.readexactly(1)
                    if first not in b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
                        break
                started = True
                deadline.reschedule(loop.time() + self.server.request_timeout_s)
                return first + await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if started and exc.partial:
                self.server.bad.warning("http_bad_request", peer=self.peer,
                                        reason="closed within the request head")
            return None
        except asyncio.LimitOverrunError as exc:
            raise HTTPError(431, f"request head over {self.server.max_head} bytes") from exc
        except TimeoutError as exc:
            if not started:
                return None
            raise HTTPError(408, "request head not received in time") from exc

    def parse(self, head: bytes) -> Request:
        lines = head[:-4].split(b"\r\n")
        line = lines[0]
        if len(line) > MAX_LINE:
            raise HTTPError(414, f"request line over {MAX_LINE} bytes")
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
            raise HTTPError(400, "malformed request line")
        method, target, version = parts
        v = _VERSION.fullmatch(version)
        if v is None:
            raise HTTPError(400, "malformed request line")
        if v.group(1) != b"1":
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1")
        if not target.startswith(b"/") or any(c < 0x21 or c == 0x7F for c in target):
            raise HTTPError(400, "request target must be a path")
        if len(lines) - 1 > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, colon, value = raw.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):  # also refuses obsolete line folding
                raise HTTPError(400, "malformed header field")
            key = name.decode("ascii").lower()
            value = value.strip(b" \t")
            if b"\r" in value or b"\n" in value or b"\0" in value:
                raise HTTPError(400, "malformed header field")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        req = Request(self, method.decode("ascii"), target.decode("latin-1"),
                      (1, int(v.group(2))), headers)
        self._frame_body(req)
        return req

    def _frame_body(self, req: Request) -> None:
        """How long the body is (RFC 9112 6.3); refuses what could smuggle a second request."""
        te = req.headers.get("transfer-encoding")
        cl = req.headers.get("content-length")
        self.expect_continue = req.headers.get("expect", "").lower() == "100-continue"
        if te is not None:
            if cl is not None:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length")
            if te.strip().lower() != "chunked":
                raise HTTPError(501, f"Transfer-Encoding {te[:40]!r} not supported (only chunked)")
            self.body_left = None
        elif cl is not None:
            values = {x.strip() for x in cl.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit() or len(cl) > 20:
                raise HTTPError(400, "malformed Content-Length")
            self.body_left = int(next(iter(values)))
        else:
            self.body_left = 0

    async def read_body(self, req: Request, limit: int) -> bytes:
        too_big = HTTPError(413, f"body over {limit} bytes")
        if self.body_left is not None and self.body_left > limit:
            raise too_big  # unread: the connection closes after the reply
        if self.expect_continue:
            self.expect_continue = False
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.server.request_timeout_s):
                if self.body_left is not None:
                    body = await self.reader.readexactly(self.body_left)
                    self.body_left = 0
                    return body
                return await self._read_chunked(limit, too_big)
        except TimeoutError as exc:
            raise HTTPError(408, "request body not received in time") from exc
        except asyncio.IncompleteReadError as exc:
            raise _Closed from exc
        except asyncio.LimitOverrunError as exc:
            raise HTTPError(400, "malformed chunked body") from exc

    async def _read_chunked(self, limit: int, too_big: HTTPError) -> bytes:
        body = bytearray()
        while True:
            line = await self.reader.readuntil(b"\r\n")
            size = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise HTTPError(400, "malformed chunked body")
            n = int(size, 16)
            if n == 0:
                break
            if len(body) + n > limit:
                raise too_big
            body += await self.reader.readexactly(n)
            if await self.reader.readexactly(2) != b"\r\n":
                raise HTTPError(400, "malformed chunked body")
        trailers = 0
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            trailers += 1
            if trailers > MAX_HEADERS:
                raise HTTPError(431, "too many trailer fields")
        self.body_left = 0
        return bytes(body)

    async def discard_body(self) -> bool:
        """Skip what the handler did not read, if it is small; False: close the connection."""
        if self.body_left == 0:
            return True
        if self.body_left is None or self.body_left > self.server.max_body or self.expect_continue:
            return False  # chunked, large, or the client still waits for 100-continue
        try:
            async with asyncio.timeout(self.server.request_timeout_s):
                await self.reader.readexactly(self.body_left)
        except (TimeoutError, asyncio.IncompleteReadError):
            return False
        self.body_left = 0
        return True

    # -- writing ---------------------------------------------------------------------------------

    async def send(self, req: Request | None, resp: Response, keep_alive: bool) -> None:
        head_only = req is not None and req.method == "HEAD"
        status = resp.status
        lines = [f"HTTP/1.1 {status} {_phrase(status)}",
                 f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}",
                 "X-Content-Type-Options: nosniff"]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        if resp.stream is None:
            lines.append(f"Content-Length: {len(resp.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        elif req is not None and req.version < (1, 1):
            lines.append("Connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only and resp.stream is None:
            data += resp.body
        self.writer.write(data)
        if resp.stream is not None:
            return  # the stream's first write drains
        try:
            async with asyncio.timeout(self.server.write_timeout_s):
                await self.writer.drain()
        except TimeoutError as exc:
            raise _Closed from exc

    async def stream(self, stream: Stream) -> None:
        """Run a streaming reply until it returns or the client closes its end."""
        body = asyncio.ensure_future(stream(BodyWriter(self.writer, self.server.write_timeout_s)))
        eof = asyncio.ensure_future(self._until_eof())
        try:
            await asyncio.wait({body, eof}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (body, eof):
                t.cancel()
            await asyncio.gather(body, eof, return_exceptions=True)
        if body.done() and not body.cancelled() and isinstance(body.exception(), Exception):
            exc = body.exception()
            if not isinstance(exc, ConnectionError):
                self.server.bad.warning("http_stream_failed", peer=self.peer, error=repr(exc))

    async def _until_eof(self) -> None:
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(4096):
                pass  # a streaming reply's client has nothing more to say

    # -- one connection --------------------------------------------------------------------------

    async def run(self) -> None:
        server = self.server
        while not server.closing:
            req: Request | None = None
            try:
                head = await self.read_head()
                if head is None:
                    return
                req = self.parse(head)
                resp = await server.handle(req)
            except HTTPError as exc:
                resp = error_response(exc.status, exc.message, exc.headers)
                if req is None or exc.status in (408, 413, 431):
                    server.bad.warning("http_bad_request", peer=self.peer, status=exc.status,
                                       reason=exc.message)
            if req is None or resp.status in (408, 413, 431) or server.closing:
                self.linger = True
                await self.send(req, resp, keep_alive=False)
                return
            keep = req.keep_alive and resp.stream is None and await self.discard_body()
            self.linger = self.body_left != 0
            await self.send(req, resp, keep)
            if resp.stream is not None:
                if req.method != "HEAD":
                    await self.stream(resp.stream)
                return
            if not keep:
                return

    async def close(self) -> None:
        if self.linger and not self.writer.is_closing():
            with contextlib.suppress(OSError, TimeoutError, asyncio.LimitOverrunError):
                async with asyncio.timeout(LINGER_S):
                    await self.writer.drain()
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    read = 0
                    while read < LINGER_BYTES:
                        chunk = await self.reader.read(65536)
                        if not chunk:
                            break
                        read += len(chunk)
        self.writer.close()
        try:
            async with asyncio.timeout(5):  # a client that never reads must not keep it open
                await self.writer.wait_closed()
        except (TimeoutError, ConnectionError):
            self.writer.transport.abort()


class HTTPServer:
    """Serves `app` (a handler: Request -> Response) on host:port until `close()`."""

    def __init__(self, app: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 max_body: int = MAX_BODY, max_head: int = MAX_HEAD,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self.app = app
        self.max_connections = max_connections
        self.max_body = max_body
        self.max_head = max_head
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.write_timeout_s = write_timeout_s
        self.bad = RateLimitedLog()
        self.closing = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (`port` 0 picks a free one). OSError if it cannot bind."""
        self._server = await asyncio.start_server(self._on_connect, host, port, reuse_address=True,
                                                  limit=self.max_head)
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else port
        return self.port

    async def handle(self, req: Request) -> Response:
        try:
            return await self.app(req)
        except (HTTPError, _Closed, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: log it with its traceback (at most once a minute), 500
            self.bad.warning("http_handler_failed", level="error", path=req.path[:200],
                             error=repr(exc), exc_info=exc)
            return error_response(500, "internal error (logged)")

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        over = len(self._tasks) >= self.max_connections
        task = asyncio.create_task(self._serve(conn, over), name=f"http[{conn.peer}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Connection, over: bool) -> None:
        try:
            if over:
                await self._refuse(conn)
            else:
                await conn.run()
        except (_Closed, ConnectionError, TimeoutError):
            pass
        except Exception as exc:  # a bug in this module: never an unhandled task error
            self.bad.warning("http_connection_failed", peer=conn.peer, error=repr(exc))
        finally:
            await conn.close()

    async def _refuse(self, conn: _Connection) -> None:
        """Over the cap: answer 503 to the first request and close. Far over it: just close."""
        self.bad.warning("http_too_many_connections", peer=conn.peer, limit=self.max_connections)
        if len(self._tasks) > 2 * self.max_connections:
            return  # a flood: do not hold a task per connection for its request
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            async with asyncio.timeout(2):
                await conn.reader.readuntil(b"\r\n\r\n")
        conn.linger = True
        await conn.send(None, error_response(503, "too many connections", [("Retry-After", "1")]),
                        keep_alive=False)

    async def close(self) -> None:
        """Stop listening and end every connection (in-flight requests are cancelled)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
