"""The Keras adapters (one layer on three backends), their divergences and timed bodies."""
