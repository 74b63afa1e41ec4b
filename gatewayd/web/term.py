"""`gatewayd status [--watch] [--url URL]`: the status page as a terminal table.

Reads the running daemon's /view.json (no history). Plain text, no dependency: a Pi's
console and an SSH session both render it. Exit status: 0 all ok, 1 something is failing
(a device, an uplink not connected, the queue's storage, or a daemon problem), 2 the daemon
cannot be reached or answered something else.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EX_OK, EX_FAILING, EX_UNREACHABLE = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:9847"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help="the daemon's health server (default: $GATEWAYD_URL, else from the "
                        f"config's [health] listen and auth, else {DEFAULT_URL})")
    p.add_argument("-c", "--config", default=os.environ.get("GATEWAYD_CONFIG", "/etc/gatewayd/gatewayd.toml"),
                   help="config whose [health] gives the address and credentials, if readable "
                        "(default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--user", default=os.environ.get("GATEWAYD_USER", ""),
                   help="basic auth user, when [health] auth is set ($GATEWAYD_USER)")
    p.add_argument("--password-file", default=os.environ.get("GATEWAYD_PASSWORD_FILE", ""),
                   help="file holding the basic auth password ($GATEWAYD_PASSWORD_FILE)")
    p.add_argument("--json", action="store_true", help="print the view as JSON instead of a table")


def fetch(url: str, user: str = "", password: str = "", timeout: float = 5.0) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + "/view.json?history=0")
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict) or "devices" not in doc:
        raise ValueError("not a gatewayd view")
    return doc


def failing(doc: dict[str, Any]) -> list[str]:
    """What is wrong, one line each ([] when all is well)."""
    out = list(doc.get("problems") or [])
    out += [f"device {n} failing: {d.get('last_error', '')}" for n, d in doc["devices"].items()
            if d.get("state") == "failing"]
    out += [f"uplink {n} {u.get('state')}: {u.get('last_error', '')}"
            for n, u in doc.get("uplinks", {}).items() if u.get("state") != "connected"]
    q = doc.get("queue") or {}
    cond = (q.get("storage") or {}).get("condition", "ok")
    if cond != "ok":
        out.append(f"queue storage {cond}")
    return out


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{round(s / 60)}m"
    return f"{s / 3600:.1f}h" if s < 172800 else f"{round(s / 86400)}d"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bool):
        return "on" if v else "off"
    return json.dumps(v) if isinstance(v, dict | list) else str(v)


def _drain_line(name: str, b: dict[str, Any], bar: int = 30) -> str:
    """`name  [#########.....]  62.5%  1,200 of 3,400 left  850/s  ETA 2s` while a backlog drains."""
    d = b.get("drain") or {}
    rows, pct = b.get("rows", 0), d.get("pct")
    if not rows or pct is None or not d.get("peak"):
        return ""
    done = max(0, min(bar, round(bar * pct / 100)))
    eta = d.get("eta_s")
    return (f"{name} backlog  [{'#' * done}{'.' * (bar - done)}]  {pct:.1f}%  {rows:,} of "
            f"{d['peak']:,} left  {d.get('rate_per_s', 0):,.0f}/s  "
            f"ETA {_ago(eta) if eta is not None else '-'}")


def _table(rows: list[list[str]], width: int) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return lines


def render(doc: dict[str, Any], width: int = 120, color: bool = False) -> str:
    now = time.time()
    out = [f"gateway {doc.get('gateway')}  ready={doc.get('ready')}  "
           f"{time.strftime('%H:%M:%S')}"]
    rows = [["DEVICE", "STATE", "SINCE", "POINTS", "LAST ERROR"]]
    for name, d in sorted(doc["devices"].items()):
        pts = " ".join(f"{p}={_value(v.get('value'))}{v.get('unit', '')}"
                       + ("" if not v.get("quality") else "?")
                       for p, v in sorted(d.get("points", {}).items()))
        rows.append([name, d["state"].upper(), _ago(now - d["since"]) if d.get("since") else "-",
                     pts or "-", d.get("last_error", "") if d["state"] == "failing" else ""])
    out += ["", *_table(rows, width)]
    rows = [["UPLINK", "STATE", "SINCE", "BACKLOG", "OLDEST", "SENT", "DROPPED", "LAST ERROR"]]
    for name, u in sorted(doc.get("uplinks", {}).items()):
        b = u.get("backlog", {})
        oldest = now - b["oldest_ts_ms"] / 1000 if b.get("oldest_ts_ms") else None
        rows.append([name, u["state"].upper(), _ago(now - u["since"]) if u.get("since") else "-",
                     str(b.get("rows", 0)), _ago(oldest), str(u.get("sent", 0)),
                     str(u.get("dropped", 0)),
                     u.get("last_error", "") if u["state"] != "connected" else ""])
    out += ["", *_table(rows, width)]
    for name, u in sorted(doc.get("uplinks", {}).items()):
        line = _drain_line(name, u.get("backlog", {}))
        if line:
            out.append(line)
    acts = doc.get("actuators", {})
    if acts:
        rows = [["ACTUATOR", "LAST COMMAND", "RESULT", "LATENCY"]]
        for name, a in sorted(acts.items()):
            c = a.get("last")
            rows.append([name, f"{c['action']} ({c['uplink']})" if c else "-",
                         ("ok" if c["ok"] else f"{c['code']} {c['message']}") if c else "-",
                         f"{c['latency_ms']}ms" if c else "-"])
        out += ["", *_table(rows, width)]
    q = doc.get("queue")
    if q:
        cond = (q.get("storage") or {}).get("condition", "?")
        caps = q.get("caps", {})
        out += ["", f"QUEUE  rows={q['rows']}/{caps.get('max_rows')}  bytes={q['bytes']}/"
                    f"{caps.get('max_bytes')}  dropped={q.get('dropped', 0)}  storage={cond.upper()}"]
    bad = failing(doc)
    summary = "FAILING:" if bad else "all ok"
    if color:
        summary = f"\x1b[1;{31 if bad else 32}m{summary}\x1b[0m"
    out += ["", summary, *(f"  {b}" for b in bad)]
    return "\n".join(out)


def from_config(path: str) -> tuple[str, str, str] | None:
    """(url, user, password) from a config's [health], or None if it cannot be read."""
    import tomllib

    from gatewayd.config import HealthSection
    from gatewayd.schema import Builder

    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    health = Builder(base_dir=Path(path).parent).build(HealthSection, doc.get("health", {}), "health")
    if health is None:
        return None
    host = health.host if health.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://[{host}]:{health.port}" if ":" in host else f"http://{host}:{health.port}"
    if health.auth is None:
        return url, "", ""
    return url, health.auth.user, health.auth.password.reveal()


def run(args: argparse.Namespace) -> int:
    password = ""
    if args.url is None:
        args.url = os.environ.get("GATEWAYD_URL")
    if args.url is None:
        found = from_config(args.config)
        args.url, user, password = found if found else (DEFAULT_URL, "", "")
        args.user = args.user or user
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            print(f"gatewayd status: cannot read {args.password_file}: {exc.strerror}", file=sys.stderr)
            return EX_UNREACHABLE
    tty = sys.stdout.isatty()
    code = EX_OK
    try:
        while True:
            try:
                doc = fetch(args.url, args.user, password)
            except urllib.error.HTTPError as exc:
                text, code = f"gatewayd status: {args.url}: HTTP {exc.code} {exc.reason}", EX_UNREACHABLE
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                text, code = f"gatewayd status: cannot reach {args.url}: {reason}", EX_UNREACHABLE
            else:
                code = EX_FAILING if failing(doc) else EX_OK
                if args.json:
                    text = json.dumps(doc, indent=2)
                else:
                    width = os.get_terminal_size().columns if tty else 200
                    text = render(doc, width, color=tty and not os.environ.get("NO_COLOR"))
            if args.watch is None:
                print(text, file=sys.stderr if code == EX_UNREACHABLE else sys.stdout)
                return code
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + text + "\n")
            sys.stdout.flush()
            time.sleep(max(0.2, args.watch))
    except KeyboardInterrupt:
        return code
