"""Every selected adapter against every golden case: ``test_golden[adapter-device-dtype-case]``."""

CHECKS = ("golden",)


def test_golden(check):
    check()
