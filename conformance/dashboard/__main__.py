"""``python -m mha_conformance.dashboard``: see ``page.py``."""

import sys

from mha_conformance.dashboard.page import main

sys.exit(main())
