"""Every selected adapter's backward against the golden gradients:
``test_gradients[gradients-adapter-device-dtype-case]``. An adapter without a backward is a skip."""

CHECKS = ("gradients",)


def test_gradients(check):
    check()
