"""Random specs (hypothesis) for every adapter against the reference."""
