"""Deliberate variants of attention, kept apart from the reference: the conventions the probes
compare, the mutants the suite must kill, and the valid orders of operations it must accept."""
