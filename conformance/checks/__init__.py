"""What is checked: the check skeleton every check runs through (``skeleton``), and each check's
own part: the golden outputs, the gradients, incremental decoding, and the metamorphic
properties (two of them advisory robustness probes)."""

from __future__ import annotations

from mha_conformance.checks.decoding import DECODING
from mha_conformance.checks.golden import GOLDEN
from mha_conformance.checks.gradients import GRADIENTS
from mha_conformance.checks.properties import PROPERTY_CHECKS
from mha_conformance.checks.skeleton import Check

#: Every check by name.
CHECKS: dict[str, Check] = {"golden": GOLDEN, "gradients": GRADIENTS, "decoding": DECODING, **PROPERTY_CHECKS}
