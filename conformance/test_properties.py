"""Metamorphic properties on every adapter: ``test_property[<property>-<adapter>-<device>-<dtype>-<case>]``."""

from mha_conformance.checks.properties import PROPERTIES

CHECKS = tuple(PROPERTIES)


def test_property(check):
    check()
