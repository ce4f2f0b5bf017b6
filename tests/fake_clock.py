"""A clock for the regression gate's tests: every reading is ``STEP`` seconds after the one before,
so a timed call takes the same time on every machine, however fast or busy it is.

Given to pytest-benchmark as ``--benchmark-timer=tests.fake_clock.ticks``: a plain call is timed
as one step (the readings before and after it); a call slowed by the gate's test hook
(``MHA_SPEED_INJECT``, which busy-waits on the same clock) reads it three more times, four steps.
"""

from __future__ import annotations

import itertools

STEP = 0.001
_readings = itertools.count(1)


def ticks() -> float:
    """The next reading: ``STEP`` seconds after the last."""
    return next(_readings) * STEP
