"""``python -m mha_conformance.probes``: see ``conventions.py``."""

import sys

from mha_conformance.probes.conventions import main

sys.exit(main())
