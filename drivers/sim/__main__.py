"""`python -m drivers.sim`: run the bench's serial device simulators in the foreground."""

import sys

from drivers.sim.bench import main

sys.exit(main())
