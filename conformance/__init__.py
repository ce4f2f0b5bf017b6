"""The conformance suite: judges adapters against the golden vectors.

Third parties validate their implementation from their own test file::

    from mha_conformance import parametrize_with_cases

    @parametrize_with_cases(my_attention)
    def test_my_attention(check):
        check()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

__all__ = ["GoldenCheck", "parametrize_with_cases"]


@dataclass(frozen=True)
class GoldenCheck:
    """One golden check, ready to run: call it inside the test."""

    adapter: Any
    case: str
    dtype: str
    device: str
    k: float

    @property
    def id(self) -> str:
        return f"golden-{self.device}-{self.dtype}-{self.case}"

    def __call__(self):
        from mha_conformance.checks.golden import check_golden

        return check_golden(self.adapter, self.case, self.dtype, self.device, self.k)


def parametrize_with_cases(
    adapter: Callable[..., Any] | Any,
    *,
    cases: str | Iterable[str] = "*",
    dtypes: Iterable[str] | None = None,
    devices: Iterable[str] = ("cpu",),
    k: float | None = None,
    name: str | None = None,
):
    """Parametrize a test's ``check`` argument with every golden check for ``adapter``.

    ``adapter`` is a function of the simple form, an Adapter subclass or an instance.
    ``cases`` are globs on case ids; ``dtypes`` default to every dtype a case lists that the
    adapter supports. Unsupported combinations skip with the adapter's reason; declared
    divergences are xfail with theirs.
    """
    import pytest

    from mha_conformance.execution import harness
    from mha_conformance.impls import registry
    from mha_conformance.tolerance import DEFAULT_K
    from mha_conformance.vectors import golden

    label = name or getattr(adapter, "name", None) or getattr(adapter, "__name__", type(adapter).__name__)
    resolved = registry.as_adapter(adapter, label)
    globs = [cases] if isinstance(cases, str) else list(cases)
    params = []
    for case_id in golden.case_ids():
        if not any(fnmatchcase(case_id, g) for g in globs):
            continue
        spec = harness.load(case_id).spec
        for device in devices:
            for dtype in dtypes or [d for d in spec["dtypes"] if d in resolved.dtypes]:
                check = GoldenCheck(resolved, case_id, dtype, device, DEFAULT_K if k is None else k)
                reason = resolved.divergence("golden", spec, dtype, device)
                marks = (
                    [pytest.mark.xfail(reason=f"declared divergence: {reason}", strict=False)]
                    if reason
                    else []
                )
                params.append(pytest.param(check, id=check.id, marks=marks))
    return pytest.mark.parametrize("check", params)
