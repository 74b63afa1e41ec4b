"""Command line: `gatewayd run|check|status|probe|sim`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
from importlib.metadata import entry_points
from typing import Any

from gatewayd.errors import ConfigError, QueueSchemaError
from gatewayd.loop import LoopFactory, LoopUnavailableError
from gatewayd.loop import choose as choose_loop
from gatewayd.version import VersionAction

EX_OK, EX_SOFTWARE, EX_CANTCREAT, EX_CONFIG = 0, 70, 73, 78
EX_USAGE = 2
SIM_INSTALL_HINT = ("gatewayd: the simulators are not installed; they are a separate bench "
                    "package: pip install gatewayd-sim (from a gatewayd checkout: pip install ./sim)")
DEFAULT_CONFIG = os.environ.get("GATEWAYD_CONFIG", "/etc/gatewayd/gatewayd.toml")


def _optional_module(name: str) -> Any:
    """Import a CLI plug-in module, or None if this build does not have it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With `command` ("run", "check", ...), only that command's plug-ins
    are imported: `gatewayd run` must not load the simulators (their HTTP clients, hubs), which
    cost the daemon half a second of start-up and megabytes of memory it never uses."""
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Edge gateway daemon: reads sensors, keeps every reading in a durable local "
                    "queue, and delivers it to EnOS, SAP HCP IoT MMS and GE Operations Hub.",
        epilog="Exit status: 0 ok, 78 (EX_CONFIG) bad config, 73 cannot create state or bind "
               "(or the queue was written by a newer gatewayd), "
               "1 internal error (a bug: systemd restarts the daemon).")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground",
                         description="Run the daemon in the foreground until SIGTERM or SIGINT. SIGHUP "
                                     "(systemctl reload) re-reads the config; an invalid one is "
                                     "logged and the running config kept.")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                     help=f"config file (default: $GATEWAYD_CONFIG or {DEFAULT_CONFIG})")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override [log] level")

    check = sub.add_parser("check", help="validate a config file and print the effective config",
                           description="Validate the config and print it with defaults filled "
                                       "in and secrets masked. Exit 0 if valid, 78 if not.")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    check.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    check.add_argument("--no-secrets", action="store_true",
                       help="check everything but the secrets: secret files and environment "
                            "variables are not read (on a workstation, before the credentials "
                            "are installed)")

    status = sub.add_parser(
        "status", help="the status page as a terminal table (devices, uplinks, queue)",
        description="Show what the running daemon reads and where every reading is. Exit 0 if "
                    "all is well, 1 if a device, uplink or the queue's storage is failing, 2 if "
                    "the daemon cannot be reached.")
    if command in (None, "status"):
        from gatewayd.web import term

        term.add_arguments(status)
        status.set_defaults(plugin=term)

    probe = _optional_module("gatewayd.probe") if command in (None, "probe") else None
    if probe is not None or command not in (None, "probe"):
        p = sub.add_parser("probe", help="commissioning: scan buses, read a device once",
                           description="Commissioning tools for a technician on site.")
        if probe is not None:
            probe.add_arguments(p)
            p.set_defaults(plugin=probe)

    sim = sub.add_parser("sim", help="run a local cloud simulator (bench and tests)",
                         description="Run a strict local stand-in for a cloud.")
    simulators = ({ep.name: ep.value for ep in entry_points(group="gatewayd.simulators")}
                  if command in (None, "sim") else {})
    if not simulators:  # the gatewayd-sim distribution is not installed: main() says so
        sim.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        sim.set_defaults(plugin=None)
    else:
        sims = sim.add_subparsers(dest="simulator", required=True, metavar="CLOUD")
    for name, module_name in sorted(simulators.items()):
        module = _optional_module(module_name)
        if module is None:
            continue
        summary = (module.__doc__ or "").strip().splitlines()
        sp = sims.add_parser(name, help=summary[0] if summary else None)
        module.add_arguments(sp)
        sp.set_defaults(plugin=module)
    return parser


def _load_config(path: str, read_secrets: bool = True) -> Any:
    from gatewayd.config import load

    try:
        return load(path, read_secrets=read_secrets)
    except ConfigError as exc:
        print(f"gatewayd: invalid config ({len(exc.problems)} problem"
              f"{'s' if len(exc.problems) != 1 else ''}):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        if read_secrets and any("secret file" in p or "environment variable" in p
                                for p in exc.problems):
            print("gatewayd: `gatewayd check --no-secrets` checks everything but the secrets",
                  file=sys.stderr)
        return None


def _loop_factory(args: argparse.Namespace, cfg: Any) -> LoopFactory | None:
    """The configured event loop's factory, or None after saying why it cannot be had."""
    try:
        return choose_loop(cfg.gateway.event_loop)[1]
    except LoopUnavailableError as exc:
        print(f"gatewayd: {args.config}: {exc}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from gatewayd.schema import to_plain

    cfg = _load_config(args.config, read_secrets=not args.no_secrets)
    if cfg is None:
        return EX_CONFIG
    if _loop_factory(args, cfg) is None:
        return EX_CONFIG
    if not args.quiet:
        plain = to_plain(cfg)
        plain["path"] = str(cfg.path)
        print(json.dumps(plain, indent=2, default=str))
    print(f"gatewayd: {args.config}: config OK ({len(cfg.devices)} devices, "
          f"{len(cfg.actuators)} actuators, {len(cfg.uplinks)} uplinks, "
          f"{len(cfg.commands)} command mappings"
          f"{'; secrets not read' if args.no_secrets else ''})", file=sys.stderr)
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from gatewayd import logs

    cfg = _load_config(args.config)
    if cfg is None:
        return EX_CONFIG
    loop_factory = _loop_factory(args, cfg)
    if loop_factory is None:
        return EX_CONFIG
    logs.setup(args.log_level or cfg.log.level, cfg.log.format)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run(cfg))


async def _run(cfg: Any) -> int:
    import structlog

    from gatewayd.service import Gateway

    log = structlog.get_logger("gatewayd")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(cfg)
    # SIGHUP reloads the config (systemctl reload), as Telegraf and Fluent Bit do.
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    try:
        await gateway.run(stop)
    except QueueSchemaError as exc:  # a newer gatewayd's queue: never touch it
        log.error("queue_schema_too_new", path=exc.path, found=exc.found, known=exc.known,
                  error=str(exc))
        print(f"gatewayd: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except OSError as exc:  # state dir not writable, port taken, ...
        log.error("gateway_failed", error=str(exc))
        return EX_CANTCREAT
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "run":
        return cmd_run(args)
    if args.plugin is None:
        print(SIM_INSTALL_HINT, file=sys.stderr)
        return EX_USAGE
    return int(args.plugin.run(args))


if __name__ == "__main__":
    sys.exit(main())
