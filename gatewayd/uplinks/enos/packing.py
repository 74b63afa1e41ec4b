"""Packing queued readings into EnOS measure-point batch messages under a size limit.

Readings of one device at one timestamp share an item (`{"productKey", "deviceKey",
"measurepoints", "time"}`; the gateway's own items carry no keys). Each item is encoded once;
a message is the envelope around a run of encoded items, so its size is known exactly before
it is built. Pure code: no I/O, tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gatewayd.uplinks.base import Item
from gatewayd.uplinks.enos.protocol import MAX_PAYLOAD_BYTES

# Room for the envelope around the items: id, version, method, the two flags.
_ENVELOPE_BYTES = 200


@dataclass(frozen=True, slots=True)
class Target:
    """Where a reading goes: the EnOS device (None keys: the gateway) and measure point."""

    product_key: str | None
    device_key: str | None
    point: str
    with_quality: bool


@dataclass(slots=True)
class Entry:
    """One wire item and the queue items it carries."""

    key: tuple[str, str] | None  # (pk, dk) of a sub-device; None for the gateway itself
    ts_ms: int
    points: dict[str, Any]
    items: list[Item] = field(default_factory=list)
    encoded: bytes = b""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {}
        if self.key is not None:
            obj["productKey"], obj["deviceKey"] = self.key
        obj["measurepoints"] = self.points
        obj["time"] = self.ts_ms
        self.encoded = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        return self.encoded

    def split(self) -> list[Entry]:
        """One entry per measure point (to isolate a point the hub refuses)."""
        out = []
        for name, value in self.points.items():
            items = [it for it in self.items if it.reading.point == name] or self.items
            e = Entry(self.key, self.ts_ms, {name: value}, items)
            e.encode()
            out.append(e)
        return out


@dataclass(slots=True)
class Message:
    """A batch message: `resume` for backlog, else `post`; `allow_offline` if it holds items
    of sub-devices that are not logged in."""

    resume: bool
    entries: list[Entry]
    allow_offline: bool = False
    size: int = 0  # upper bound of the payload in bytes, kept by `add`

    def __post_init__(self) -> None:
        self.size = _ENVELOPE_BYTES + sum(len(e.encoded) + 1 for e in self.entries)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.size += len(entry.encoded) + 1

    @property
    def items(self) -> list[Item]:
        return [it for e in self.entries for it in e.items]

    def params_json(self) -> bytes:
        return b"[" + b",".join(e.encoded for e in self.entries) + b"]"

    def halves(self) -> list[Message]:
        """Two messages with half the entries each; a single entry is split by point."""
        if len(self.entries) == 1:
            parts = self.entries[0].split()
            if len(parts) == 1:
                return [self]
            return [Message(self.resume, [p], self.allow_offline) for p in parts]
        mid = len(self.entries) // 2
        return [Message(self.resume, self.entries[:mid], self.allow_offline),
                Message(self.resume, self.entries[mid:], self.allow_offline)]


def wire_value(value: Any, quality: int, with_quality: bool) -> Any:
    """The measure point value, wrapped as `{"value", "quality"}` where configured."""
    return {"value": value, "quality": int(quality)} if with_quality else value


def build_entries(items: Iterable[Item], resolve: Callable[[Item], Target | None],
                  reject: Callable[[Item, str, str], None]) -> list[tuple[bool, Entry]]:
    """Group items into (backlog, entry) pairs by device and timestamp, in first-seen order.

    `resolve` maps an item to its target or None (`resolve` reports why through `reject`).
    """
    entries: dict[tuple[bool, tuple[str, str] | None, int], Entry] = {}
    for it in items:
        target = resolve(it)
        if target is None:
            continue
        r = it.reading
        if r.value is None and not target.with_quality:
            reject(it, "no_value", f"{r.device}.{r.point} has no value (quality {r.quality})")
            continue
        key = None if target.product_key is None else (target.product_key, target.device_key or "")
        gk = (it.backlog, key, r.ts_ms)
        entry = entries.get(gk)
        if entry is None:
            entry = entries[gk] = Entry(key, r.ts_ms, {})
        entry.points[target.point] = wire_value(r.value, r.quality, target.with_quality)
        entry.items.append(it)
    for e in entries.values():
        e.encode()
    return [(gk[0], e) for gk, e in entries.items()]


def pack(entries: Sequence[tuple[bool, Entry]], max_bytes: int,
         reject: Callable[[Item, str, str], None]) -> list[Message]:
    """Messages of at most `max_bytes` (and never above 512 KiB), backlog apart from live.

    Messages come out in the entries' order: a message ends when it is full or when the lane
    changes (backlog to live), so sending them in turn keeps every series in order.
    An entry too large on its own is split by point; a single point too large is rejected.
    """
    limit = min(max_bytes, MAX_PAYLOAD_BYTES)
    out: list[Message] = []
    msg: Message | None = None
    for backlog, entry in entries:
        for e in _fit(entry, limit, reject):
            if msg is not None and (msg.resume != backlog or
                                    msg.size + len(e.encoded) + 1 > limit):
                out.append(msg)
                msg = None
            if msg is None:
                msg = Message(backlog, [])
            msg.add(e)
    if msg is not None and msg.entries:
        out.append(msg)
    return out


def _fit(entry: Entry, limit: int, reject: Callable[[Item, str, str], None]) -> list[Entry]:
    if _ENVELOPE_BYTES + len(entry.encoded) + 1 <= limit:
        return [entry]
    parts = entry.split()
    if len(parts) == 1:
        for it in entry.items:
            reject(it, "too_large", f"{len(entry.encoded)} bytes exceed the {limit}-byte limit")
        return []
    return [p for part in parts for p in _fit(part, limit, reject)]
