"""The static conformance page (``python -m mha_conformance.dashboard``) and its plots."""
