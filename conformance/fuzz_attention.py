"""``nox -s fuzz``: random specs (conformance/strategies.py) for every adapter against the reference.

Not collected by default runs (its name does not start with ``test_``); run it explicitly:
``python -m pytest conformance/fuzz_attention.py --adapter torch-sdpa [--dtype float32]
[--fuzz-examples 100]``. Hypothesis shrinks a failure to its smallest spec and prints the line
that reproduces it; its example database (``.hypothesis/fuzz``) makes the next run start from
past failures.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Unsatisfiable

from conformance.harness import JUDGED, judge_golden, unsupported
from conformance.strategies import specs
from vectors import golden
from vectors.generate import case_tensors

DATABASE = Path(os.environ.get("MHA_FUZZ_DB", ".hypothesis/fuzz"))


def synthetic_case(spec: dict) -> golden.GoldenCase:
    """Inputs, truth and baselines for a drawn spec, made exactly as the generator makes them."""
    spec = dict(spec)
    tensors, baseline = case_tensors(spec)
    return golden.GoldenCase(spec, tensors, baseline, Path("<fuzz>"), synthetic=True)


def check_spec(adapter, spec: dict, dtype: str, device: str, suite) -> None:
    """Run one drawn spec; assume() away what the adapter cannot express or declares."""
    case = synthetic_case(spec)
    assume(unsupported(adapter, case, dtype, device) is None)
    # Declared divergences are keyed by the catalogue's naming (e.g. *fully_masked*).
    tag = case.id + ("_fully_masked" if case.spec["fully_masked_rows"] else "")
    assume(adapter.divergence("golden", tag, dtype, device) is None)
    ex = suite.runner.execute(adapter, case, dtype, device)
    assume(ex.status != "skip")
    repro = (
        f"MHA_FUZZ_SPEC={shlex.quote(json.dumps(spec, sort_keys=True))} python -m pytest "
        f"conformance/fuzz_attention.py --adapter {adapter.name} --dtype {dtype} --device {device}"
    )
    if ex.status != "ok":
        raise AssertionError(f"{adapter.name} on spec {case.id}: {ex.message}\nReproduce: {repro}")
    for name in JUDGED:
        if name in ex.result:
            v = judge_golden(ex.result[name], case, name, dtype, suite.k)
            assert v.passed, f"{adapter.name} on drawn spec {case.id}:\n  {v.describe()}\nReproduce: {repro}"


def pytest_generate_tests(metafunc):  # one fuzz test per adapter x dtype
    suite = metafunc.config.stash[__import__("conformance.conftest", fromlist=["SUITE"]).SUITE]
    dtypes = metafunc.config.getoption("--dtype") or ["float32"]
    device = metafunc.config.getoption("--device")
    metafunc.parametrize(
        "adapter_name,dtype,device",
        [(a.name, d, device) for a in suite.adapters for d in dtypes],
        ids=[f"{a.name}-{device}-{d}" for a in suite.adapters for d in dtypes],
    )


def test_fuzz(adapter_name, dtype, device, suite, request):
    adapter = suite.by_name[adapter_name]
    if adapter.missing() or adapter.device_unavailable(device):
        pytest.skip(adapter.missing() or adapter.device_unavailable(device))
    given_spec = os.environ.get("MHA_FUZZ_SPEC")
    if given_spec:  # reproduce one reported failure
        check_spec(adapter, json.loads(given_spec), dtype, device, suite)
        return
    examples = int(request.config.getoption("--fuzz-examples"))

    @settings(
        max_examples=examples, deadline=None, database=DirectoryBasedExampleDatabase(str(DATABASE)),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        print_blob=True,
    )  # fmt: skip
    @given(spec=specs(dtype=dtype))
    def fuzz(spec):
        check_spec(adapter, spec, dtype, device, suite)

    try:
        fuzz()
    except Unsatisfiable:
        pytest.skip(f"{adapter.name} can express none of the {examples} drawn specs (see its supports())")
