"""EnOS hub simulator (`gatewayd sim enos`): a strict MQTT 3.1.1 hub for tests, benches, demos.

Python API: `async with EnosSimulator(Registry.load(path)) as sim:` (see `simulator.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gatewayd_sim.enos.hub import Accepted, CommandRecord, Hub, HubOptions
from gatewayd_sim.enos.registry import Device, Product, Registry, RegistryError, StateFile
from gatewayd_sim.enos.simulator import EnosSimulator, TlsFiles
from gatewayd_sim.kit import EXIT_USAGE, serve

__all__ = ["Accepted", "CommandRecord", "Device", "EnosSimulator", "Hub", "HubOptions",
           "Product", "Registry", "TlsFiles", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, required=True,
                        help="TOML or JSON file with products, devices and topology")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11883, help="MQTT port (EnOS: 11883)")
    parser.add_argument("--tls-port", type=int, default=18883, help="MQTT over TLS (EnOS: 18883)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="CA for client certificates")
    parser.add_argument("--require-client-cert", action="store_true")
    parser.add_argument("--http-port", type=int, default=18080, help="control API port")
    parser.add_argument("--lenient-replies", action="store_true",
                        help="send replies even to clients that did not subscribe to them")
    parser.add_argument("--no-throttle", action="store_true",
                        help="do not block devices that reconnect more than 4 times in 2 min")
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help="keep the hub's run-time state (topology, activated secrets, "
                             "registered devices) in FILE across restarts")
    parser.add_argument("--keepalive", choices=["refuse", "clamp", "accept"], default="refuse",
                        help="a keepalive outside 60-300 s: refused (CONNACK 5), clamped "
                             "into the range, or accepted as asked")
    parser.add_argument("--clean-session-zero", choices=["keep", "refuse"], default="keep",
                        help="clean_session=0: keep the session's subscriptions across "
                             "reconnects, or refuse the CONNECT (CONNACK 5)")
    parser.add_argument("--no-record", action="store_true",
                        help="count accepted points without keeping them (long benches)")


def run(args: argparse.Namespace) -> int:
    """Run the simulator until interrupted. Returns an exit status."""
    try:
        registry = Registry.load(args.registry)
    except (OSError, RegistryError) as exc:
        print(f"enos sim: {exc}")
        return EXIT_USAGE
    if args.state is not None:
        try:
            StateFile(args.state).load_into(Registry.load(args.registry))  # fail early, clearly
        except (OSError, RegistryError) as exc:
            print(f"enos sim: state {args.state}: {exc}")
            return EXIT_USAGE
    tls = None
    if args.tls_cert:
        if not args.tls_key:
            print("enos sim: --tls-cert needs --tls-key")
            return EXIT_USAGE
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca, args.require_client_cert)
    defaults = HubOptions()
    options = HubOptions(lenient_replies=args.lenient_replies,
                         throttle=None if args.no_throttle else defaults.throttle,
                         record_points=not args.no_record, keepalive=args.keepalive,
                         clean_session_zero=args.clean_session_zero)
    sim = EnosSimulator(registry, host=args.host, port=args.port, tls=tls,
                        tls_port=args.tls_port, http_port=args.http_port, options=options,
                        state_file=args.state)

    def banner() -> None:
        print(f"enos sim: mqtt {args.host}:{sim.port}"
              + (f", mqtts {sim.tls_port}" if tls else "")
              + f", control http://{args.host}:{sim.http_port}", flush=True)

    return serve("enos", sim.start, sim.stop, banner)
