"""The health server's HTTP/1.1 layer over real sockets on 127.0.0.1: keep-alive and
pipelining, HEAD, bodies (length, chunked, 100-continue), every limit and timeout, streaming
replies and their clients going away, the connection cap, clean close and quiet logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from gatewayd import httpd
from gatewayd.httpd import BodyWriter, HTTPError, HTTPServer, Request, Response, Router, json_response


class App:
    """Routes for the tests, and what the stream handler saw."""

    def __init__(self) -> None:
        self.router = Router()
        self.stream_started = asyncio.Event()
        self.stream_ended = asyncio.Event()
        self.stream_error: BaseException | None = None
        self.gate = asyncio.Event()
        r = self.router
        r.add("GET", "/hello", self.hello)
        r.add("POST", "/echo", self.echo)
        r.add("POST", "/ignore", self.hello)
        r.add("GET", "/boom", self.boom)
        r.add("GET", "/files/{name}", self.file)
        r.add("GET", "/stream", self.stream)
        r.add("GET", "/flood", self.flood)

    async def hello(self, req: Request) -> Response:
        return json_response({"path": req.path, "query": req.query})

    async def echo(self, req: Request) -> Response:
        body = await req.read(1000)
        return Response(body, content_type="application/octet-stream")

    async def boom(self, req: Request) -> Response:
        raise RuntimeError("a bug")

    async def file(self, req: Request) -> Response:
        if req.match["name"] != "a.txt":
            raise HTTPError(404)
        return Response(b"A")

    async def stream(self, req: Request) -> Response:
        async def body(out: BodyWriter) -> None:
            self.stream_started.set()
            try:
                await out.write(b"data: one\n\n")
                await self.gate.wait()
                await out.write(b"data: two\n\n")
            except BaseException as exc:
                self.stream_error = exc
                raise
            finally:
                self.stream_ended.set()

        return Response(content_type="text/event-stream", stream=body)

    async def flood(self, req: Request) -> Response:
        async def body(out: BodyWriter) -> None:
            self.stream_started.set()
            try:
                while True:
                    await out.write(b"x" * 1_000_000)
            except BaseException as exc:
                self.stream_error = exc
                raise
            finally:
                self.stream_ended.set()

        return Response(content_type="text/event-stream", stream=body)


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[HTTPServer, App]]:
    app = App()
    opts: dict[str, Any] = getattr(request, "param", {})
    srv = HTTPServer(app.router, **opts)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv, app
    finally:
        await srv.close()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, srv: HTTPServer) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", srv.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(10):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
            n = 0 if head_only else int(headers.get("content-length", "0"))
            return status, headers, await self.reader.readexactly(n)

    async def closed(self) -> bool:
        """True once the server closed its end (EOF after whatever it sent)."""
        async with asyncio.timeout(10):
            return await self.reader.read() is not None

    async def eof(self) -> bytes:
        async with asyncio.timeout(10):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


async def test_keep_alive_and_pipelining(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(get("/hello?a=1&b=%20x"))
    status, headers, body = await c.response()
    assert status == 200 and json.loads(body) == {"path": "/hello", "query": {"a": "1", "b": " x"}}
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff" and "connection" not in headers
    # three requests in one write: three answers, in order, on the same connection
    await c.send(get("/hello?n=1") + get("/files/a.txt") + get("/hello?n=3"))
    assert json.loads((await c.response())[2])["query"] == {"n": "1"}
    assert (await c.response())[2] == b"A"
    assert json.loads((await c.response())[2])["query"] == {"n": "3"}
    # Connection: close is honoured: the answer says so and the server closes
    await c.send(get("/hello", "Connection: close\r\n"))
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "close"
    assert await c.eof() == b""
    c.close()


async def test_http10_closes_unless_keep_alive(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(get("/hello", "Connection: keep-alive\r\n", "1.0"))
    assert (await c.response())[1]["connection"] == "keep-alive"
    await c.send(get("/hello", version="1.0"))
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "close"
    assert await c.eof() == b""
    c.close()


async def test_head_sends_headers_only(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(b"HEAD /files/a.txt HTTP/1.1\r\n\r\n")
    status, headers, body = await c.response(head_only=True)
    assert status == 200 and headers["content-length"] == "1" and body == b""
    await c.send(get("/files/a.txt"))  # no body came before this answer
    assert (await c.response())[2] == b"A"
    await c.send(b"HEAD /stream HTTP/1.1\r\n\r\n")  # a stream's headers, and no stream
    status, headers, _ = await c.response(head_only=True)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert await c.eof() == b""
    c.close()


async def test_unknown_paths_and_methods_get_json_errors(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    for req, code in ((get("/nope"), 404), (get("/files/b.txt"), 404), (get("/files/"), 404),
                      (b"DELETE /hello HTTP/1.1\r\n\r\n", 405), (get("/echo"), 405)):
        await c.send(req)
        status, headers, body = await c.response()
        reply = json.loads(body)
        assert status == code and reply["ok"] is False and reply["code"] == code, (req, reply)
    assert headers["allow"] == "POST"
    await c.send(b"PUT /hello HTTP/1.1\r\n\r\n")
    assert (await c.response())[1]["allow"] == "GET, HEAD"
    await c.send(get("/hello"))  # errors like these keep the connection
    assert (await c.response())[0] == 200
    c.close()


@pytest.mark.parametrize("request_bytes, code", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /hello\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET hello HTTP/1.1\r\n\r\n", 400),
    (b"GET /hello HTTX/1.1\r\n\r\n", 400),
    (b"GET /hello HTTP/2.0\r\n\r\n", 505),
    (b"G(T /hello HTTP/1.1\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nName : v\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nA: b\nB: c\r\n\r\n", 400),
    (b"\xff\xfe\x00 / HTTP/1.1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
])
async def test_malformed_requests_get_a_json_error_and_close(server: tuple[HTTPServer, App],
                                                             request_bytes: bytes, code: int) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(request_bytes)
    status, headers, body = await c.response()
    assert status == code and json.loads(body)["code"] == code
    assert headers["connection"] == "close"
    assert await c.eof() == b""
    c.close()


async def test_bodies_by_length_chunked_and_100_continue(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert (await c.response())[2] == b"hello"
    await c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n")
    assert (await c.response())[2] == b"abcdefg"
    # a body the handler does not read is skipped: the connection stays usable
    await c.send(b"POST /ignore HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz" + get("/files/a.txt"))
    assert (await c.response())[0] == 200 and (await c.response())[2] == b"A"
    await c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(10):
        assert await c.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"ok")
    assert (await c.response())[2] == b"ok"
    c.close()


@pytest.mark.parametrize("request_bytes", [
    b"POST /echo HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",  # over the handler's 1000
    b"POST /echo HTTP/1.1\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"200\r\n" + b"x" * 512 + b"\r\n") * 2,
])
async def test_oversize_bodies_get_413_unread(server: tuple[HTTPServer, App], request_bytes: bytes) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(request_bytes)
    status, headers, body = await c.response()
    assert status == 413 and json.loads(body)["message"] == "body over 1000 bytes"
    assert headers["connection"] == "close"
    assert await c.eof() == b""  # no 100 Continue came first, and nothing after
    c.close()


async def test_malformed_chunked_body(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    c = await Client.open(srv)
    await c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    status, _, body = await c.response()
    assert status == 400 and json.loads(body)["message"] == "malformed chunked body"
    assert await c.eof() == b""
    c.close()


@pytest.mark.parametrize("server", [{"request_timeout_s": 0.2, "idle_timeout_s": 2.0}], indirect=True)
async def test_slow_clients_are_timed_out(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    # a head that never ends: 408, then closed
    c = await Client.open(srv)
    await c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = await c.response()
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["message"] == "request head not received in time"
    assert await c.eof() == b""
    c.close()
    # a body that never comes
    c = await Client.open(srv)
    await c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert (await c.response())[0] == 408
    assert await c.eof() == b""
    c.close()
    # an idle keep-alive connection is closed quietly, after serving its request
    c = await Client.open(srv)
    await c.send(get("/hello"))
    assert (await c.response())[0] == 200
    assert await c.eof() == b""
    c.close()


async def test_a_stream_ends_when_its_client_goes_away(server: tuple[HTTPServer, App]) -> None:
    srv, app = server
    c = await Client.open(srv)
    await c.send(get("/stream"))
    status, headers, _ = await c.response(head_only=True)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["connection"] == "close" and "content-length" not in headers
    async with asyncio.timeout(10):
        assert await c.reader.readuntil(b"\n\n") == b"data: one\n\n"
    c.close()  # gone while the stream waits for its next event
    async with asyncio.timeout(10):
        await app.stream_ended.wait()
    assert isinstance(app.stream_error, asyncio.CancelledError)


async def test_a_stream_that_finishes_closes_the_connection(server: tuple[HTTPServer, App]) -> None:
    srv, app = server
    c = await Client.open(srv)
    await c.send(get("/stream"))
    await c.response(head_only=True)
    app.gate.set()
    assert await c.eof() == b"data: one\n\ndata: two\n\n"
    c.close()


@pytest.mark.parametrize("server", [{"write_timeout_s": 0.3}], indirect=True)
async def test_a_client_that_does_not_read_a_stream_is_dropped(server: tuple[HTTPServer, App]) -> None:
    srv, app = server
    c = await Client.open(srv)
    await c.send(get("/flood"))  # and never read what comes back
    async with asyncio.timeout(30):
        await app.stream_ended.wait()
    assert isinstance(app.stream_error, ConnectionError), app.stream_error
    c.close()


@pytest.mark.parametrize("server", [{"max_connections": 2}], indirect=True)
async def test_connections_over_the_cap_get_503(server: tuple[HTTPServer, App]) -> None:
    srv, _ = server
    held = [await Client.open(srv) for _ in range(2)]
    for c in held:  # each answered: both are served connections now
        await c.send(get("/hello"))
        assert (await c.response())[0] == 200
    extra = await Client.open(srv)
    await extra.send(get("/hello"))
    status, headers, body = await extra.response()
    assert status == 503 and json.loads(body)["message"] == "too many connections"
    assert headers["retry-after"] == "1" and await extra.eof() == b""
    extra.close()
    held.pop().close()
    async with asyncio.timeout(10):
        while len(srv._tasks) > 1:  # the server saw that one go
            await asyncio.sleep(0.01)
    again = await Client.open(srv)
    await again.send(get("/hello"))
    assert (await again.response())[0] == 200
    for c in (*held, again):
        c.close()


async def test_handler_bugs_get_500_and_bad_clients_do_not_flood_the_log(
        server: tuple[HTTPServer, App], monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _ = server
    with capture_logs() as logs:
        c = await Client.open(srv)
        for _ in range(3):
            await c.send(get("/boom"))
            status, _, body = await c.response()
            assert status == 500 and json.loads(body) == {
                "ok": False, "code": 500, "message": "internal error (logged)"}
        c.close()
        for _ in range(30):
            c = await Client.open(srv)
            await c.send(b"GARBAGE\r\n\r\n")
            assert (await c.response())[0] == 400
            c.close()
    kinds = [e["event"] for e in logs]
    assert kinds.count("http_handler_failed") == 1 and kinds.count("http_bad_request") == 1, logs
    failed = next(e for e in logs if e["event"] == "http_handler_failed")
    assert failed["log_level"] == "error" and isinstance(failed["exc_info"], RuntimeError)
    # after the quiet period, one more line says how many were not logged
    monkeypatch.setattr(httpd, "LOG_EVERY_S", 0.0)
    with capture_logs() as logs:
        c = await Client.open(srv)
        await c.send(b"GARBAGE\r\n\r\n")
        await c.response()
        c.close()
    assert [(e["event"], e["not_logged"]) for e in logs] == [("http_bad_request", 29)]


async def test_close_ends_streams_and_idle_connections() -> None:
    app = App()
    srv = HTTPServer(app.router)
    await srv.start("127.0.0.1", 0)
    idle = await Client.open(srv)
    await idle.send(get("/hello"))
    await idle.response()
    streaming = await Client.open(srv)
    await streaming.send(get("/stream"))
    await streaming.response(head_only=True)
    async with asyncio.timeout(10):
        await app.stream_started.wait()
        await srv.close()
    assert await idle.eof() == b""
    assert (await streaming.eof()).startswith(b"data: one")
    assert app.stream_ended.is_set() and not srv._tasks
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", srv.port)
    idle.close()
    streaming.close()


async def test_binding_a_taken_port_raises_oserror() -> None:
    first = HTTPServer(Router())
    port = await first.start("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await HTTPServer(Router()).start("127.0.0.1", port)
    finally:
        await first.close()
