"""The JAX and Flax adapters, their jitted functions (``common``) and timed bodies (``timed``)."""
