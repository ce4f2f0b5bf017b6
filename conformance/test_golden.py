"""Every selected adapter against every golden case: ``test_golden[adapter-device-dtype-case]``."""

from __future__ import annotations

from conformance.harness import CheckRecord, check_golden


def test_golden(golden, suite, request):
    record = request.node.mha_record = CheckRecord()
    adapter = suite.by_name[golden.adapter]
    check_golden(
        adapter, golden.case, golden.dtype, golden.device, suite.k, record, suite.runner, suite.vectors
    )
