"""``nox -s fuzz``: random specs (conformance/fuzzing/strategies.py) for every adapter against the reference.

Not collected by default runs (its name does not start with ``test_``); run it explicitly:
``python -m pytest -p mha_conformance.plugin --pyargs mha_conformance.fuzzing.fuzz_attention --adapter
torch-sdpa [--dtype float32] [--fuzz-examples 100]``. Hypothesis shrinks a failure to its smallest spec and prints the line
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

from mha_conformance.checks.golden import GOLDEN
from mha_conformance.checks.skeleton import run_check
from mha_conformance.fuzzing.strategies import specs
from mha_conformance.impls.adapter import refusal
from mha_conformance.plugin import suite_of
from mha_conformance.vectors import golden
from mha_conformance.vectors.generate import case_tensors

DATABASE = Path(os.environ.get("MHA_FUZZ_DB", ".hypothesis/fuzz"))


def synthetic_case(spec: dict) -> golden.GoldenCase:
    """Inputs, truth and baselines for a drawn spec, made exactly as the generator makes them."""
    spec = dict(spec)
    tensors, baseline = case_tensors(spec)
    return golden.GoldenCase(spec, tensors, baseline, Path("<fuzz>"), synthetic=True)


def check_spec(adapter, spec: dict, dtype: str, device: str, suite) -> None:
    """Run one drawn spec through the golden check; assume() away what the adapter cannot express
    or declares."""
    case = synthetic_case(spec)
    assume(refusal(adapter, case.spec, dtype, device) is None)
    assume(adapter.divergence("golden", case.spec, dtype, device) is None)
    repro = (
        f"MHA_FUZZ_SPEC={shlex.quote(json.dumps(spec, sort_keys=True))} python -m pytest -p mha_conformance.plugin "
        f"--pyargs mha_conformance.fuzzing.fuzz_attention --adapter {adapter.name} --dtype {dtype} --device {device}"
    )
    try:
        run_check(GOLDEN, adapter, case, dtype, device, k=suite.k, runner=suite.runner, reproduce=repro)
    except pytest.skip.Exception:
        assume(False)


def pytest_generate_tests(metafunc):  # one fuzz test per adapter x dtype
    suite = suite_of(metafunc.config)
    dtypes = metafunc.config.getoption("--dtype") or ["float32"]
    device = metafunc.config.getoption("--device")
    metafunc.parametrize(
        "adapter_name,dtype,device",
        [(a.name, d, device) for a in suite.adapters for d in dtypes],
        ids=[f"{a.name}-{device}-{d}" for a in suite.adapters for d in dtypes],
    )


def test_fuzz(adapter_name, dtype, device, suite, request):
    adapter = suite.by_name[adapter_name]
    reason = adapter.missing() or adapter.device_unavailable(device)
    if reason:
        pytest.skip(reason)
    given_spec = os.environ.get("MHA_FUZZ_SPEC")
    if given_spec:  # reproduce one reported failure
        check_spec(adapter, json.loads(given_spec), dtype, device, suite)
        return
    examples = int(request.config.getoption("--fuzz-examples"))

    @settings(
        max_examples=examples,
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(DATABASE)),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        print_blob=True,
    )
    @given(spec=specs(dtype=dtype, variants=adapter.variants))
    def fuzz(spec):
        check_spec(adapter, spec, dtype, device, suite)

    try:
        fuzz()
    except Unsatisfiable:
        pytest.skip(f"{adapter.name} can express none of the {examples} drawn specs (see its supports())")
