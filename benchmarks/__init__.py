"""The asv benchmark suite: how fast each adapter's attention runs, per device (docs/benchmarks.md)."""
