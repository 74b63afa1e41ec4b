"""The compose bench's smoke test (run by docker/test.sh once `compose up` returned): readings
reach all three simulators, one command from each reaches a relay and its result comes back.

Talks only to the simulators' and the daemon's HTTP endpoints on 127.0.0.1. Every wait polls
the state it needs with a generous deadline as a failure bound, never a fixed sleep.
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
from collections.abc import Callable
from typing import Any

from gatewayd_sim.mms import API_BASE, DEFAULT_FROM_TYPE, DEFAULT_TO_TYPE, RESULT_TYPE

MMS_PUSH_USER = ("bench-push", "bench-push-pw")  # compose.yaml: mms --push-user

DEADLINE_S = float(os.environ.get("SMOKE_DEADLINE_S", "90"))


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def until(what: str, probe: Callable[[], Any]) -> Any:
    """Poll `probe` until it returns something truthy; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = probe()
        except (OSError, urllib.error.URLError, ValueError) as exc:  # not up yet
            got, last = None, exc
        if got:
            return got
        time.sleep(0.5)  # poll interval between two looks at another process's state
    raise SystemExit(f"smoke: FAILED waiting for {what} ({DEADLINE_S:.0f} s); last error: {last}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enos-http", type=int, required=True)
    ap.add_argument("--opshub", type=int, required=True)
    ap.add_argument("--mms", type=int, required=True)
    ap.add_argument("--health", type=int, required=True)
    a = ap.parse_args()
    enos = f"http://127.0.0.1:{a.enos_http}"
    opshub = f"http://127.0.0.1:{a.opshub}"
    mms = f"http://127.0.0.1:{a.mms}"
    health = f"http://127.0.0.1:{a.health}"
    t0 = time.monotonic()

    until("gatewayd /healthz", lambda: http("GET", f"{health}/healthz") is not None)

    # readings in all three clouds
    pts = until("readings in the EnOS simulator", lambda: http("GET", f"{enos}/points?limit=5"))
    print(f"smoke: enos: {len(pts)} latest points, e.g. {pts[-1]['deviceKey']}.{pts[-1]['point']}"
          f"={pts[-1]['value']}")
    rows = until("readings in the Operations Hub simulator",
                 lambda: [r for r in http("GET", f"{opshub}/sim/data?limit=50")["rows"]
                          if r["metric"] != "cmd_result"])
    print(f"smoke: opshub: {len(rows)} rows, e.g. {rows[-1]['metric']}={rows[-1]['data']}")
    rows = until("readings in the MMS simulator",
                 lambda: http("GET", f"{mms}/sim/rows/{DEFAULT_FROM_TYPE}?limit=50")["rows"])
    print(f"smoke: mms: {len(rows)} rows of {DEFAULT_FROM_TYPE}, e.g. "
          f"{rows[-1].get('C_SENSOR')}={rows[-1].get('C_VALUE')}")

    # one command from each cloud to a relay, and its result
    until("the EnOS gateway online with its sub-devices",
          lambda: any(d["online"] for d in http("GET", f"{enos}/devices") if d["deviceKey"] == "bench-gw"))
    body = {"productKey": "BENCHGW", "deviceKey": "bench-gw", "service": "set_relay",
            "params": {"channel": 2, "on": True}, "wait_s": 20}
    rec = until("the EnOS set_relay reply", lambda: http("POST", f"{enos}/commands", body)["reply"])
    if rec.get("code") != 200:
        raise SystemExit(f"smoke: FAILED: EnOS set_relay answered {rec}")
    print(f"smoke: enos: service set_relay(channel=2, on=true) -> {rec}")

    dc = "BENCH/01-23-45-67-89-ab"
    http("POST", f"{opshub}/sim/commands", {"dc": dc, "command": "relay1=on"})
    res = until("the Operations Hub cmd_result",
                lambda: http("GET", f"{opshub}/sim/data?metric=cmd_result")["rows"])
    print(f"smoke: opshub: command relay1=on -> cmd_result {res[-1]['data']} ({res[-1].get('description')})")

    auth = base64.b64encode(":".join(MMS_PUSH_USER).encode()).decode()
    push = {"method": "ws", "sender": "smoke", "messageType": DEFAULT_TO_TYPE,
            "messages": [{"opcode": "relay_on", "operand": "5"}]}
    def pushed_and_answered() -> Any:
        # a ws push to a device whose socket is (re)connecting is dropped, as the real MMS does:
        # push again if no result came within a while
        http("POST", f"{mms}{API_BASE}/http/push/bench-gw", push, {"Authorization": f"Basic {auth}"})
        end = time.monotonic() + 15
        while time.monotonic() < end:
            rows = http("GET", f"{mms}/sim/rows/{RESULT_TYPE}")["rows"]
            if rows:
                return rows
            time.sleep(0.5)  # poll interval
        return None

    res = until("the MMS command result", pushed_and_answered)
    print(f"smoke: mms: push relay_on(operand=5) -> result ok={res[-1].get('C_OK')} "
          f"code={res[-1].get('C_CODE')} {res[-1].get('C_MESSAGE')!r}")
    bad = [r for r in res if str(r.get("C_OK")).lower() not in ("true", "1")]
    if bad:
        raise SystemExit(f"smoke: FAILED: MMS command result not ok: {bad}")

    status = http("GET", f"{health}/status")
    print("smoke: gatewayd devices: "
          + ", ".join(f"{n}={d['state']}" for n, d in sorted(status["devices"].items())))
    print(f"smoke: all three simulators have readings and a command result ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
