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
