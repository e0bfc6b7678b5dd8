"""``python -m epp.sim``: same as ``epp sim``."""

import sys

from epp.sim.cli import main

sys.exit(main())
