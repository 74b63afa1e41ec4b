"""The simulator's device registry: products, devices, secrets and gateway topology.

Loaded from TOML or JSON (same shape), or built in code by tests:

    [products.GWPK]
    secret = "product-secret"          # the product secret (dynamic activation signs with it)
    dynamic_activation = false
    require_ssl = false                # CONNECT only over TLS
    [products.SUBPK.model]             # optional thing model: point -> type; others get 1204
    temp = "float"                     # int, float, double, bool, string, enum, array, struct

    [[devices]]
    product_key = "GWPK"
    device_key = "gw01"
    secret = "device-secret"           # omit for a device that must be activated dynamically
    node_type = "gateway"              # gateway, direct or sub (sub cannot connect: 771)
    enabled = true
    sub_devices = ["SUBPK/meter-001"]  # sub-devices this gateway may add to its topology
    topology = []                      # sub-devices already in its topology
"""

from __future__ import annotations

import json
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, str]  # (product key, device key)

_MODEL_TYPES = frozenset({"int", "float", "double", "bool", "string", "enum", "array", "struct"})


@dataclass
class Product:
    product_key: str
    secret: str
    dynamic_activation: bool = False
    require_ssl: bool = False
    model: dict[str, str] | None = None  # point -> type; None accepts any point and value


@dataclass
class Device:
    product_key: str
    device_key: str
    secret: str | None = None  # None until dynamically activated
    node_type: str = "direct"  # "gateway", "direct" or "sub"
    enabled: bool = True
    sub_devices: set[Key] = field(default_factory=set)  # allowed under this gateway
    topology: set[Key] = field(default_factory=set)  # currently under this gateway
    asset_id: str = field(default_factory=lambda: secrets.token_hex(4))
    attributes: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    name: str = ""

    @property
    def key(self) -> Key:
        return (self.product_key, self.device_key)


class RegistryError(ValueError):
    """The registry file is invalid."""


def _key(text: str, where: str) -> Key:
    pk, sep, dk = text.partition("/")
    if not sep or not pk or not dk:
        raise RegistryError(f"{where}: expected \"productKey/deviceKey\", got {text!r}")
    return (pk, dk)


@dataclass
class Registry:
    products: dict[str, Product] = field(default_factory=dict)
    devices: dict[Key, Device] = field(default_factory=dict)

    def add_product(self, product: Product) -> Product:
        if product.model is not None:
            bad = {t for t in product.model.values() if t not in _MODEL_TYPES}
            if bad:
                raise RegistryError(f"product {product.product_key}: unknown model types {bad}")
        self.products[product.product_key] = product
        return product

    def add_device(self, device: Device) -> Device:
        if device.product_key not in self.products:
            raise RegistryError(f"device {device.device_key}: unknown product {device.product_key}")
        if device.node_type not in ("gateway", "direct", "sub"):
            raise RegistryError(f"device {device.device_key}: bad node_type {device.node_type!r}")
        self.devices[device.key] = device
        return device

    def gateway_of(self, sub: Key) -> Device | None:
        """The gateway whose topology holds `sub`, if any."""
        for dev in self.devices.values():
            if sub in dev.topology:
                return dev
        return None

    @classmethod
    def load(cls, path: Path) -> Registry:
        """Read a TOML (`.toml`) or JSON registry file. Raises RegistryError or OSError."""
        text = path.read_text()
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: {exc}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "registry") -> Registry:
        reg = cls()
        try:
            for pk, p in raw.get("products", {}).items():
                reg.add_product(Product(pk, str(p["secret"]), bool(p.get("dynamic_activation")),
                                        bool(p.get("require_ssl")), p.get("model")))
            for i, d in enumerate(raw.get("devices", [])):
                at = f"{where}: devices[{i}]"
                reg.add_device(Device(
                    d["product_key"], d["device_key"], d.get("secret"),
                    d.get("node_type", "direct"), bool(d.get("enabled", True)),
                    {_key(s, at) for s in d.get("sub_devices", [])},
                    {_key(s, at) for s in d.get("topology", [])},
                    name=d.get("name", d["device_key"])))
        except (KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{where}: missing or malformed field {exc}") from None
        return reg


# -- the hub's run-time state (`--state FILE`) ------------------------------------------------

STATE_VERSION = 1


def _key_text(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def device_state(dev: Device) -> dict[str, Any]:
    return {"product_key": dev.product_key, "device_key": dev.device_key, "secret": dev.secret,
            "node_type": dev.node_type, "enabled": dev.enabled,
            "sub_devices": sorted(map(_key_text, dev.sub_devices)),
            "topology": sorted(map(_key_text, dev.topology)), "asset_id": dev.asset_id,
            "attributes": dev.attributes, "tags": dev.tags, "name": dev.name}


def registry_state(reg: Registry) -> dict[str, Any]:
    """Everything the hub changes at run time: devices with their secrets (activation,
    registration), topology, attributes, tags, enabled flags and asset ids."""
    return {"version": STATE_VERSION, "devices": [device_state(d) for d in reg.devices.values()]}


def apply_state(reg: Registry, state: dict[str, Any], where: str = "state") -> None:
    """Lay a saved state over the registry: saved devices replace or join the file's ones."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RegistryError(f"{where}: not a version {STATE_VERSION} simulator state")
    try:
        for i, d in enumerate(state["devices"]):
            at = f"{where}: devices[{i}]"
            if d["product_key"] not in reg.products:
                continue  # its product left the registry file: the device goes with it
            reg.add_device(Device(
                d["product_key"], d["device_key"], d.get("secret"), d["node_type"],
                bool(d["enabled"]), {_key(s, at) for s in d["sub_devices"]},
                {_key(s, at) for s in d["topology"]}, str(d["asset_id"]),
                dict(d["attributes"]), dict(d["tags"]), str(d.get("name", d["device_key"]))))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise RegistryError(f"{where}: missing or malformed field {exc}") from None


class StateFile:
    """The hub's state on disk, written whole and atomically (temp file, fsync, rename) after
    each change, so a kill at any moment leaves the previous or the new state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes = 0
        self._last = b""

    def load_into(self, reg: Registry) -> bool:
        """Apply the saved state if the file exists; False if there was none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return False
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path}: {exc}") from None
        apply_state(reg, state, str(self.path))
        return True

    def save(self, reg: Registry) -> None:
        import os

        data = json.dumps(registry_state(reg), sort_keys=True, indent=1).encode()
        if data == self._last:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = data
        self.writes += 1
