"""Advisory measurements: which conventions an adapter follows, and its dropout statistics."""
