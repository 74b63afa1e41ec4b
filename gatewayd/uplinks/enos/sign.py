"""The EnOS sign: the password of an MQTT CONNECT and the `sign` of sub-device logins.

EnOS calls its methods "hmacsha256" and the like, but every SDK and the hub compute a *plain*
hash: sort the parameters by key, concatenate key1 value1 key2 value2 ..., append the secret,
hash the UTF-8 bytes, hex-encode. SHA-256 and MD5 come out lower-case, SHA-1 upper-case (as the
SDKs emit them); a verifier must compare case-insensitively.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

# signmethod alias (lower-cased) -> hashlib name; "hmac" in a name does not mean HMAC.
SIGN_METHODS: dict[str, str] = {
    "sha256": "sha256",
    "hmacsha256": "sha256",
    "sha1": "sha1",
    "hmacsha1": "sha1",
    "md5": "md5",
    "hmacmd5": "md5",
}


class SignMethodError(ValueError):
    """The signmethod is not one EnOS knows."""


def sign_content(params: Mapping[str, str], secret: str) -> str:
    """The string that gets hashed: sorted key/value pairs, then the secret."""
    return "".join(k + str(params[k]) for k in sorted(params)) + secret


def sign(params: Mapping[str, str], secret: str, method: str = "sha256") -> str:
    """Hex digest of `sign_content(params, secret)` with `method` (any alias, any case).

    Raises SignMethodError for an unknown method.
    """
    algo = SIGN_METHODS.get(method.lower())
    if algo is None:
        raise SignMethodError(f"unknown signmethod {method!r}")
    digest = hashlib.new(algo, sign_content(params, secret).encode()).hexdigest()
    return digest.upper() if algo == "sha1" else digest


def login_params(product_key: str, device_key: str, client_id: str,
                 timestamp: str) -> dict[str, str]:
    """The four signed fields of a CONNECT or a sub-device login (nothing else is signed)."""
    return {
        "productKey": product_key,
        "deviceKey": device_key,
        "clientId": client_id,
        "timestamp": timestamp,
    }


def device_sign(product_key: str, device_key: str, secret: str, client_id: str, timestamp: str,
                method: str = "sha256") -> str:
    """Sign for a device or sub-device login: CONNECT password, `combine.login`, `topo.add`."""
    return sign(login_params(product_key, device_key, client_id, timestamp), secret, method)


def verify(expected_params: Mapping[str, str], secret: str, method: str, given: str) -> bool:
    """True if `given` is the sign of `expected_params` + `secret`, in either hex case."""
    try:
        want = sign(expected_params, secret, method)
    except SignMethodError:
        return False
    return hmac.compare_digest(want.lower(), given.strip().lower())


def mqtt_credentials(product_key: str, device_key: str, secret: str, secure_mode: int,
                     timestamp: str, client_id: str | None = None,
                     method: str = "sha256") -> tuple[str, str, str]:
    """(client id, username, password) of an EnOS CONNECT.

    `client_id` (the sign clientId) defaults to the device key; `secret` is the device secret
    for secure mode 2 and the product secret for mode 3.
    """
    cid = client_id or device_key
    mqtt_client_id = f"{cid}|securemode={secure_mode},signmethod={method},timestamp={timestamp}|"
    username = f"{device_key}&{product_key}"
    password = device_sign(product_key, device_key, secret, cid, timestamp, method)
    return mqtt_client_id, username, password


def parse_client_id(client_id: str) -> tuple[str, dict[str, str]]:
    """Split an EnOS MQTT client id into (sign clientId, attributes).

    The sign clientId is everything before the first `|`; the attributes sit between the first
    and the last `|`, as comma-separated `key=value` pairs in any order, spaces tolerated.
    Raises ValueError if there is no attribute section.
    """
    first, last = client_id.find("|"), client_id.rfind("|")
    if first < 0 or last == first:
        raise ValueError("client id has no |securemode=..,signmethod=..,timestamp=..| section")
    attrs: dict[str, str] = {}
    for part in client_id[first + 1:last].split(","):
        key, sep, value = part.partition("=")
        if sep:
            attrs[key.strip().lower()] = value.strip()
    return client_id[:first], attrs
