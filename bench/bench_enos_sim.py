"""EnOS simulator: request/reply rate against the number of subscriptions on the connection.

Every reply is checked against the connection's subscriptions (the hub only answers a
subscribed `_reply` topic). A gateway with many sub-devices holds one exact filter per
sub-device and request kind. One raw MQTT client (no client library in the way) pipelines
measure-point posts and counts the replies.

    python bench/bench_enos_sim.py                 # 1 and 5,001 filters
    python bench/bench_enos_sim.py --filters 1 101 5001 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sim"))

from gatewayd_sim.enos import Device, EnosSimulator, HubOptions, Product, Registry  # noqa: E402
from gatewayd_sim.enos.wire import expected_sign  # noqa: E402

PK, DK, SECRET = "BENCHPK", "bench-gw", "bench-secret"


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            break
    return bytes([(kind << 4) | flags]) + bytes(length) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, mult = 0, 1
    while True:
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return first >> 4, await reader.readexactly(length) if length else b""


async def run_case(filters: int, seconds: float, window: int) -> float:
    reg = Registry()
    reg.add_product(Product(PK, "product-secret"))
    reg.add_device(Device(PK, DK, SECRET, "gateway"))
    async with EnosSimulator(reg, options=HubOptions(throttle=None, record_points=False)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        ts = "1700000000000"
        password = expected_sign({"productKey": PK, "deviceKey": DK, "clientId": DK,
                                  "timestamp": ts}, SECRET, "sha256")
        assert password is not None
        cid = f"{DK}|securemode=2,signmethod=sha256,timestamp={ts}|"
        body = _utf8("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + _utf8(cid) + \
            _utf8(f"{DK}&{PK}") + _utf8(password)
        writer.write(_packet(1, 0, body))
        kind, ack = await _read_packet(reader)
        assert kind == 2 and ack[1] == 0, ack
        topic = f"/sys/{PK}/{DK}/thing/measurepoint/post"
        subs = [f"/sys/{PK}/sub-{i}/thing/measurepoint/post_reply" for i in range(filters - 1)]
        subs.append(topic + "_reply")
        for i in range(0, len(subs), 500):
            chunk = b"".join(_utf8(f) + b"\x00" for f in subs[i:i + 500])
            writer.write(_packet(8, 2, struct.pack("!H", 1 + i // 500) + chunk))
            kind, _ = await _read_packet(reader)
            assert kind == 9
        payload = json.dumps({"id": "1", "version": "1.0", "method": "thing.measurepoint.post",
                              "params": {"measurepoints": {"v": 1.0}}}).encode()
        request = _packet(3, 0, _utf8(topic) + payload)  # QoS 0: no PUBACK in the way
        replies = 0
        deadline = time.perf_counter() + seconds
        writer.write(request * window)
        t0 = time.perf_counter()
        while time.perf_counter() < deadline:
            kind, _ = await _read_packet(reader)
            if kind == 3:
                replies += 1
                writer.write(request)  # keep `window` requests in flight
        elapsed = time.perf_counter() - t0
        writer.close()
        return replies / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, nargs="+", default=[1, 5001])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=64, help="requests in flight")
    args = ap.parse_args()
    for n in args.filters:
        rate = asyncio.run(run_case(n, args.seconds, args.window))
        print(f"enos sim request/reply: {n:>6} filter(s) on the connection: {rate:>9,.0f} "
              f"requests/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
