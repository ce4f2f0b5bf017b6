"""Incremental decoding: feeding one token at a time through an adapter's KV cache gives the
full causal pass's output (``test_decoding[decoding-<adapter>-<device>-<dtype>-<case>]``)."""

CHECKS = ("decoding",)


def test_decoding(check):
    check()
