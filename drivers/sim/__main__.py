"""Run the simulated charger hardware: ``python -m drivers.sim --help``."""

import sys

from drivers.sim.hardware import main

sys.exit(main())
