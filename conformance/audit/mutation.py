"""The mutation score: does the suite fail every deliberately wrong implementation?

``python -m mha_conformance.audit.mutation [--case GLOB ...] [--dtype D ...] [--quick] [--json PATH]
[--markdown PATH]`` runs the whole suite (``python -m mha_conformance``: the golden checks and
whatever other checks the suite holds) in one subprocess against every mutant in ``impls/variants/mutants.py`` and their correct
twin, reads the JSON report and prints, per mutant, whether it was killed and by which cases,
then the score. Exit status 0 when every mutant is killed and the twin passes, else 1.

``--kernel`` audits the kernels' shape-dependent bugs instead (``KERNEL_MUTANTS``): each is run
on the committed catalogue and on the kernel tier (``--kernel-scale``). The table shows both: a
mutant the committed cases cannot see and the kernel tier kills is the evidence the tier is
needed. Exit status 0 when the kernel tier kills every one and the twin passes both.

A mutant is killed when at least one of its tests *fails* (the verdict, or a crash judged as a
failure); errors of the harness do not count. The twin must have no failure and no error: a
suite that fails a correct implementation kills mutants for the wrong reason. A survivor is a
gap in the catalogue or the tolerance (docs/checks.md, "Mutation score"), never a mutant to drop.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mha_conformance import __main__ as suite
from mha_conformance.impls.variants import mutants
from mha_conformance.results.tables import write_markdown


@dataclass
class MutantResult:
    """What the suite did to one adapter: counts by outcome and the (check, case, dtype) that failed."""

    name: str
    bug: str
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return bool(self.failed)

    def killing_cases(self) -> list[str]:
        """Case ids that killed it, in catalogue order, with the dtypes in which each did."""
        by_case: dict[str, list[str]] = {}
        for check, case, dtype in sorted(self.failed, key=lambda f: f[0] != "golden"):  # golden first
            label = case if check == "golden" else f"{check}:{case}"
            dtypes = by_case.setdefault(label, [])
            if dtype not in dtypes:
                dtypes.append(dtype)
        return [f"{c} ({', '.join(d)})" for c, d in by_case.items()]


@dataclass
class MutationRun:
    """The outcome of one run: the twin, every mutant, and the suite's exit status."""

    twin: MutantResult
    mutants: list[MutantResult]
    exit_status: int
    args: list[str]

    @property
    def score(self) -> tuple[int, int]:
        return sum(m.killed for m in self.mutants), len(self.mutants)

    @property
    def twin_passes(self) -> bool:
        return (
            not self.twin.failed
            and not self.twin.counts.get("error")
            and bool(self.twin.counts.get("passed"))
        )

    @property
    def ok(self) -> bool:
        killed, total = self.score
        return killed == total and self.twin_passes

    def as_dict(self) -> dict[str, Any]:
        killed, total = self.score
        return {
            "score": f"{killed}/{total}",
            "killed": killed,
            "total": total,
            "twin_passes": self.twin_passes,
            "args": self.args,
            "exit_status": self.exit_status,
            "twin": asdict(self.twin),
            "mutants": [asdict(m) | {"killed": m.killed} for m in self.mutants],
        }


def results_from_report(
    report: dict[str, Any], adapters: Sequence[type[mutants.Correct]]
) -> list[MutantResult]:
    """One MutantResult per adapter class, from a conformance JSON report."""
    out = {cls.name: MutantResult(cls.name, cls.bug) for cls in adapters}
    for test in report["tests"]:
        result = out.get(test["adapter"])
        if result is None:
            continue
        result.counts[test["outcome"]] = result.counts.get(test["outcome"], 0) + 1
        if test["outcome"] == "failed":
            result.failed.append((test["check"], test["case"], test["dtype"]))
    return list(out.values())


def run(
    pytest_args: Sequence[str] = (), adapters: Sequence[type[mutants.Correct]] | None = None
) -> MutationRun:
    """Run the suite once on the twin and ``adapters`` (default: every mutant) in a subprocess.

    ``pytest_args`` narrow it (``--case``, ``--dtype``); the score in docs/generated/mutation.md comes
    from the run without them.
    """
    chosen = list(mutants.MUTANTS if adapters is None else adapters)
    every = [mutants.Correct, *chosen]
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "mutation.json"
        args = ["-q", "--no-header", "-o", "addopts=", "--tb=no", "--report", str(report_path), *pytest_args]
        for cls in every:
            args += ["--adapter", mutants.ref(cls)]
        proc = suite.run(args)
        if not report_path.exists():
            raise RuntimeError(
                f"the suite wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
            )
        report = json.loads(report_path.read_text())
    results = results_from_report(report, every)
    return MutationRun(results[0], results[1:], proc.returncode, list(pytest_args))


def format_table(result: MutationRun, max_cases: int = 4) -> str:
    """Markdown: mutant, its bug, killed?, tests failed / run, the first cases that killed it."""
    lines = [
        "| mutant | bug | killed | tests failed / run | killed by (first cases) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in [*result.mutants, result.twin]:
        run_count = sum(m.counts.values()) - m.counts.get("skipped", 0)
        cases = m.killing_cases()
        shown = ", ".join(f"`{c}`" for c in cases[:max_cases]) + (
            f" and {len(cases) - max_cases} more" if len(cases) > max_cases else ""
        )
        verdict = (
            ("yes" if m.killed else "**SURVIVED**")
            if m is not result.twin
            else ("passes" if result.twin_passes else "**FAILS**")
        )
        golden = sum(check == "golden" for check, _, _ in m.failed)
        failed = f"{golden} golden + {len(m.failed) - golden} other / {run_count}"
        lines.append(f"| `{m.name}` | {m.bug} | {verdict} | {failed} | {shown or '-'} |")
    killed, total = result.score
    lines.append("")
    lines.append(
        f"Mutation score: {killed}/{total} killed; correct twin {'passes' if result.twin_passes else 'FAILS'}."
    )
    return "\n".join(lines)


def format_kernel_table(small: MutationRun, kernel: MutationRun, max_cases: int = 3) -> str:
    """Markdown: each kernel mutant on the committed catalogue and on the kernel tier."""
    lines = [
        "| mutant | bug | committed catalogue | kernel tier | killed by (first kernel cases) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def outcome(m: MutantResult, twin: bool, passes: bool) -> str:
        run_count = sum(m.counts.values()) - m.counts.get("skipped", 0)
        if twin:
            return f"{'passes' if passes else '**FAILS**'} ({run_count} tests)"
        return f"{'killed' if m.killed else 'survives'} ({len(m.failed)} of {run_count} failed)"

    pairs = [*zip(small.mutants, kernel.mutants, strict=True), (small.twin, kernel.twin)]
    for m_small, m_kernel in pairs:
        twin = m_small is small.twin
        cases = m_kernel.killing_cases()
        shown = ", ".join(f"`{c}`" for c in cases[:max_cases]) + (
            f" and {len(cases) - max_cases} more" if len(cases) > max_cases else ""
        )
        kernel_cell = outcome(m_kernel, twin, kernel.twin_passes)
        if not twin and not m_kernel.killed:
            kernel_cell = f"**SURVIVED** ({kernel_cell})"
        lines.append(
            f"| `{m_small.name}` | {m_small.bug} | {outcome(m_small, twin, small.twin_passes)} | {kernel_cell} | "
            f"{shown or '-'} |"
        )
    killed, total = kernel.score
    seen = small.score[0]
    lines += [
        "",
        f"Kernel tier: {killed}/{total} killed; committed catalogue alone: {seen}/{total}; correct twin "
        f"{'passes' if small.twin_passes and kernel.twin_passes else 'FAILS'} on both.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.audit.mutation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--case", action="append", default=[], help="narrow to case globs (repeatable)")
    parser.add_argument("--dtype", action="append", default=[], help="narrow to dtypes (repeatable)")
    parser.add_argument(
        "--quick", action="store_true", help="the suite's quick tier (it must kill them all too)"
    )
    parser.add_argument(
        "--mutant", action="append", default=[], help="only these mutants (names, repeatable)"
    )
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="the kernels' shape-dependent mutants, on the committed catalogue and on the kernel tier",
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument(
        "--markdown", type=Path, help="also write the table, stamped, here (docs/generated/mutation.md)"
    )
    args = parser.parse_args(argv)
    pytest_args = (
        [a for c in args.case for a in ("--case", c)]
        + [a for d in args.dtype for a in ("--dtype", d)]
        + (["--quick"] if args.quick else [])
    )
    pool = mutants.KERNEL_MUTANTS if args.kernel else mutants.MUTANTS
    chosen = [m for m in pool if not args.mutant or m.name in args.mutant]
    command = " ".join(
        ["python -m mha_conformance.audit.mutation", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.kernel:
        small = run(pytest_args, chosen)
        result = run([*pytest_args, "--kernel-scale"], chosen)
        text, ok = format_kernel_table(small, result), result.ok and small.twin_passes
        data = {"committed": small.as_dict(), "kernel": result.as_dict()}
    else:
        result = run(pytest_args, chosen)
        text, ok, data = format_table(result), result.ok, result.as_dict()
    print(text)
    if args.markdown:
        write_markdown(args.markdown, command, text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
