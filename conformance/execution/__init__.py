"""Running adapters: preparing and calling them (``harness``), in a worker process (``worker``)."""
