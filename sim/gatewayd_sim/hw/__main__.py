"""`python -m gatewayd_sim.hw`: run the bench's serial device simulators in the foreground."""

import sys

from gatewayd_sim.hw.bench import main

sys.exit(main())
