"""``python -m agent`` is the ``evcp`` command."""

import sys

from agent.cli import main

sys.exit(main())
