"""Every selected adapter against every golden case: ``test_golden[adapter-device-dtype-case]``."""

from __future__ import annotations

from conformance.harness import CheckRecord, check_golden


def test_golden(golden, suite, request):
    record = request.node.mha_record = CheckRecord()
    check_golden(suite.by_name[golden.adapter], golden.case, golden.dtype, golden.device, suite.k, record)
