"""Builds frozen dataclasses from TOML tables by their type hints, collecting every error.

Each error names the key path and what was expected, so the config loader can report them all
at once: `devices[2].interval: expected a duration like "10s", got "fast"`.

Supported field types: bool, int, float, str, Literal[...], X | None, list[X], tuple[X, ...],
dict[str, X], nested dataclasses, Any, `Secret`, and the `drivers.base` markers `Duration`,
`ByteSize` and `Range`. A dataclass may raise ValueError in `__post_init__`; the message is
reported at its path.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from drivers.base import Range, Unit

_MISSING = dataclasses.MISSING

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Secret:
    """A secret string that never shows itself in repr, logs or `check` output.

    In TOML a secret field `password` is given as one of: `password = "..."` (discouraged),
    `password_env = "VAR"`, or `password_file = "path"` (relative paths resolve against
    $CREDENTIALS_DIRECTORY when systemd sets it, else against the config file's folder).
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "inline") -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<{self.source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(value: object) -> float:
    """Seconds from "10s", "500ms", "2m", "1h", "7d" or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError


def parse_size(value: object) -> int:
    """Bytes from "64MiB", "512KB", "100B" or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError


def did_you_mean(word: object, candidates: object) -> str:
    """' (did you mean "x"?)' for the closest candidate to a misspelt `word`, else ''."""
    if not isinstance(word, str):
        return ""
    names = [c for c in candidates if isinstance(c, str)]  # type: ignore[attr-defined]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:
        close = [c for c in names if c.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: object) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


class Builder:
    """Converts nested TOML values into typed objects, appending problems to `errors`."""

    def __init__(self, base_dir: Path | None = None, env: Mapping[str, str] | None = None,
                 *, read_secrets: bool = True) -> None:
        self.errors: list[str] = []
        self.base_dir = (base_dir or Path.cwd()).absolute()
        self.env = os.environ if env is None else env
        # False (`gatewayd check --no-secrets`): secret files and variables are named but not read.
        self.read_secrets = read_secrets

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}" if path else message)

    # -- dataclasses --------------------------------------------------------------------------

    def build(self, cls: type[Any], table: object, path: str, *, skip: frozenset[str] = frozenset(),
              also: frozenset[str] = frozenset()) -> Any:
        """Build dataclass `cls` from `table`; returns None if anything in it was invalid.

        Keys in `skip` are ignored (the caller handles them). Keys in `also` are handled by the
        caller too, but belong to the same table: they are listed (and suggested) when a key
        is unknown, so `intervall` in a device is answered with `interval`.
        """
        if not isinstance(table, dict):
            self.error(path, f"expected a table, got {_show(table)}")
            return None
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        known: set[str] = set(skip) | set(also)
        kwargs: dict[str, Any] = {}
        before = len(self.errors)
        for f in fields:
            tp = hints[f.name]
            key_path = f"{path}.{f.name}" if path else f.name
            if _is_secret(tp):
                known.update({f.name, f"{f.name}_env", f"{f.name}_file"})
                secret = self._secret(table, f.name, path)
                if secret is not None:
                    kwargs[f.name] = secret
                elif f.default is _MISSING and f.default_factory is _MISSING and not _optional(tp):
                    if not any(k in table for k in (f.name, f"{f.name}_env", f"{f.name}_file")):
                        self.error(key_path, f"missing secret: set {f.name}_env or {f.name}_file")
                continue
            known.add(f.name)
            if f.name not in table:
                if f.default is _MISSING and f.default_factory is _MISSING:
                    self.error(key_path, f"missing required key (expected {self._expect(tp)})")
                continue
            kwargs[f.name] = self.value(tp, table[f.name], key_path)
        for key in table:
            if key not in known:
                listed = sorted(k for k in known if k not in skip)
                self.error(f"{path}.{key}" if path else key,
                           f"unknown key{did_you_mean(key, listed)} (expected one of: {', '.join(listed)})")
        if len(self.errors) != before:
            return None
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            self.error(path, str(exc))
            return None

    def _secret(self, table: dict[str, Any], name: str, path: str) -> Secret | None:
        given = [k for k in (name, f"{name}_env", f"{name}_file") if k in table]
        prefix = f"{path}." if path else ""
        if len(given) > 1:
            self.error(f"{prefix}{name}", f"give only one of {', '.join(given)}")
            return None
        if not given:
            return None
        key = given[0]
        raw = table[key]
        if not isinstance(raw, str) or not raw:
            self.error(f"{prefix}{key}", f"expected a non-empty string, got {_show(raw)}")
            return None
        if key == name:
            return Secret(raw, "inline")
        if key.endswith("_env"):
            if not self.read_secrets:
                return Secret("", f"env {raw} (not read)")
            value = self.env.get(raw)
            if not value:
                self.error(f"{prefix}{key}", f"environment variable {raw} is not set or empty")
                return None
            return Secret(value, f"env {raw}")
        p = Path(raw)
        where = ""
        if not p.is_absolute():
            creds = self.env.get("CREDENTIALS_DIRECTORY")
            p = (Path(creds) if creds else self.base_dir) / p
            where = (" (in $CREDENTIALS_DIRECTORY)" if creds else
                     " (next to the config file; under systemd, in $CREDENTIALS_DIRECTORY)")
        if not self.read_secrets:
            return Secret("", f"file {p} (not read)")
        try:
            value = p.read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.error(f"{prefix}{key}",
                       f"cannot read secret file {p}{where}: {exc.strerror or exc}")
            return None
        if not value:
            self.error(f"{prefix}{key}", f"secret file {p} is empty")
            return None
        return Secret(value, f"file {p}")

    # -- values -------------------------------------------------------------------------------

    def _expect(self, tp: Any) -> str:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *meta = typing.get_args(tp)
            for m in meta:
                if isinstance(m, Unit):
                    if m.kind == "duration":
                        return 'a duration like "10s" or "500ms"'
                    return 'a size like "64MiB"'
            return self._expect(base)
        if origin is Literal:
            return "one of " + ", ".join(_show(a) for a in typing.get_args(tp))
        if origin in (list, tuple):
            return "an array"
        if origin is dict:
            return "a table"
        if origin in (Union, types.UnionType):
            return " or ".join(self._expect(a) for a in typing.get_args(tp) if a is not type(None))
        return _type_name(tp)

    def value(self, tp: Any, raw: object, path: str) -> Any:
        """Convert one value to `tp`; on failure record an error and return None."""
        origin = typing.get_origin(tp)
        if tp is Any or tp is object:
            return raw
        if origin is typing.Annotated:
            base, *meta = typing.get_args(tp)
            out = raw
            for m in meta:
                if isinstance(m, Unit):
                    try:
                        out = parse_duration(raw) if m.kind == "duration" else parse_size(raw)
                    except ValueError:
                        self.error(path, f"expected {self._expect(tp)}, got {_show(raw)}")
                        return None
                    break
            else:
                out = self.value(base, raw, path)
                if out is None:
                    return None
            for m in meta:
                if isinstance(m, Range) and isinstance(out, int | float):
                    if (m.min is not None and out < m.min) or (m.max is not None and out > m.max):
                        lo = "-inf" if m.min is None else _num(m.min)
                        hi = "inf" if m.max is None else _num(m.max)
                        self.error(path, f"expected a value from {lo} to {hi}, got {_show(raw)}")
                        return None
            return out
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                return self.value(args[0], raw, path)
            for a in args:
                trial = Builder(self.base_dir, self.env, read_secrets=self.read_secrets)
                out = trial.value(a, raw, path)
                if not trial.errors:
                    return out
            self.error(path, f"expected {self._expect(tp)}, got {_show(raw)}")
            return None
        if origin is Literal:
            choices = typing.get_args(tp)
            if raw in choices and type(raw) in {type(c) for c in choices}:
                return raw
            self.error(path, f"expected {self._expect(tp)}, got {_show(raw)}{did_you_mean(raw, choices)}")
            return None
        if origin in (list, tuple):
            if not isinstance(raw, list):
                self.error(path, f"expected an array, got {_show(raw)}")
                return None
            (item_tp, *_rest) = typing.get_args(tp) or (Any,)
            items = [self.value(item_tp, v, f"{path}[{i}]") for i, v in enumerate(raw)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(raw, dict):
                self.error(path, f"expected a table, got {_show(raw)}")
                return None
            _, val_tp = typing.get_args(tp) or (str, Any)
            return {k: self.value(val_tp, v, f"{path}.{k}") for k, v in raw.items()}
        if dataclasses.is_dataclass(tp):
            return self.build(tp, raw, path)  # type: ignore[arg-type]
        if tp is bool:
            if isinstance(raw, bool):
                return raw
        elif tp is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
        elif tp is float:
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                return float(raw)
        elif tp is str:
            if isinstance(raw, str):
                return raw
        else:
            raise TypeError(f"schema: unsupported field type {tp!r} at {path}")
        self.error(path, f"expected {_type_name(tp)}, got {_show(raw)}")
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_secret(tp: Any) -> bool:
    if tp is Secret:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return Secret in typing.get_args(tp)
    return False


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


# -- effective config output --------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """A JSON/TOML-able view of a config object, with secrets masked."""
    if isinstance(obj, Secret):
        return f"<secret from {obj.source}>"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
