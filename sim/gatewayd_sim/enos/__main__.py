"""`python -m gatewayd_sim.enos`: the simulator without the gatewayd CLI."""

import argparse

from gatewayd_sim.enos import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m gatewayd_sim.enos")
add_arguments(parser)
raise SystemExit(run(parser.parse_args()))
