"""A minimal MQTT 3.1.1 broker for what mosquitto will not do: send a PUBLISH on a wildcard
topic, or refuse a subscription (SUBACK 0x80). One client at a time; QoS 0/1."""

from __future__ import annotations

import asyncio
import contextlib
import struct


def _packet(kind: int, body: bytes) -> bytes:
    n, out = len(body), bytearray([kind])
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


class RawBroker:
    def __init__(self, suback: int = 0x01) -> None:
        self.suback = suback
        self.port = 0
        self.subscribed = asyncio.Event()
        self.published: list[tuple[str, bytes]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawBroker:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()

    def send_publish(self, topic: str, payload: bytes) -> None:
        t = topic.encode()
        for w in self._writers:
            w.write(_packet(0x30, struct.pack("!H", len(t)) + t + payload))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readexactly(1))[0]
                n, mult = 0, 1
                while True:
                    b = (await reader.readexactly(1))[0]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    if not b & 0x80:
                        break
                body = await reader.readexactly(n)
                kind = head >> 4
                if kind == 1:  # CONNECT
                    writer.write(_packet(0x20, b"\x00\x00"))
                elif kind == 8:  # SUBSCRIBE: packet id, then (topic, qos) pairs
                    pid, i, count = body[:2], 2, 0
                    while i < len(body):
                        (tl,) = struct.unpack("!H", body[i:i + 2])
                        i += 2 + tl + 1
                        count += 1
                    writer.write(_packet(0x90, pid + bytes([self.suback] * count)))
                    self.subscribed.set()
                elif kind == 3:  # PUBLISH from the client
                    (tl,) = struct.unpack("!H", body[:2])
                    topic, rest = body[2:2 + tl].decode(), body[2 + tl:]
                    if (head >> 1) & 3:
                        writer.write(_packet(0x40, rest[:2]))
                        rest = rest[2:]
                    self.published.append((topic, rest))
                elif kind == 12:  # PINGREQ
                    writer.write(_packet(0xD0, b""))
                elif kind == 14:  # DISCONNECT
                    break
                await writer.drain()
        writer.close()
