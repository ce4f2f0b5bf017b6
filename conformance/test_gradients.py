"""Every selected adapter's backward against the golden gradients:
``test_gradients[adapter-device-dtype-case]``. An adapter without a backward is a skip saying so."""

from __future__ import annotations

from conformance.gradients import check_gradients
from conformance.harness import CheckRecord

CHECK = "gradients"


def test_gradients(target, suite, request):
    record = request.node.mha_record = CheckRecord()
    adapter = suite.by_name[target.adapter]
    check_gradients(
        adapter, target.case, target.dtype, target.device, suite.k, record, suite.runner, suite.vectors
    )
