"""Golden vectors: catalogue, generator, loader and the committed case files."""
