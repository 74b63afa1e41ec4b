"""Cloud simulators for benches and tests (`gatewayd sim NAME`).

Each module listed here offers `add_arguments(parser)` and `run(args) -> int` for the CLI, and
an importable simulator class for tests.
"""

SIMULATORS: dict[str, str] = {
    "enos": "gatewayd_sim.enos",
    "mms": "gatewayd_sim.mms",
    "opshub": "gatewayd_sim.opshub",
}
