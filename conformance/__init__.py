"""The conformance suite: judges adapters against the golden vectors."""
