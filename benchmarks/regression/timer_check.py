"""How far asv's timing of a configuration is from ``torch.utils.benchmark``'s, in one process.

``python benchmarks/regression/timer_check.py [--adapter torch-sdpa] [--shape gpt-t512]
[--dtype float32] [--causal] [--rounds 5]``

Runs asv's own timing code (``asv_runner``'s TimeBenchmark, with the suite's repeat and
warm-up attributes) on ``Forward.time_forward`` and ``Timer.blocked_autorange`` on the same
call (with the same thread count: ``Timer`` defaults to one thread), alternating so drift
in the machine's load hits both, and prints the median of each and their ratio. The
README's timing figure comes from here.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from asv_runner.benchmarks.time import TimeBenchmark  # noqa: E402

from benchmarks import bench_attention, common  # noqa: E402
from mha_conformance.impls.bench import bench_threads  # noqa: E402


def asv_median(params: tuple) -> float:
    instance = bench_attention.Forward()
    bench = TimeBenchmark(
        "bench_attention.Forward.time_forward",
        instance.time_forward,
        [instance.time_forward, instance, bench_attention],
    )
    bench.set_param_idx(list(itertools.product(*bench_attention.PARAMS)).index(params))
    if bench.do_setup():
        raise SystemExit(f"{params} is skipped here")
    try:
        samples = bench.do_run()["samples"]
    finally:
        bench.do_teardown()
    return statistics.median(samples)


def torch_median(config: common.Configuration, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    # Timer runs single-threaded unless told: give it the thread count the suite fixes.
    timer = Timer(stmt="forward()", globals={"forward": config.forward}, num_threads=bench_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="torch-sdpa")
    parser.add_argument("--shape", default="gpt-t512")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    params = (args.adapter, args.shape, args.dtype, args.causal)
    config = common.configuration(*params, common.device())
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(asv_median(params))
        theirs.append(torch_median(config, args.min_run_time))
    a, t = statistics.median(ours), statistics.median(theirs)
    print(f"{config.label} ({config.bench.meta.get('threads')} threads)")
    print(
        f"asv (suite's settings): median {a * 1e3:.3f} ms over {args.rounds} rounds {[round(x * 1e3, 3) for x in ours]}"
    )
    print(
        f"torch.utils.benchmark:  median {t * 1e3:.3f} ms over {args.rounds} rounds {[round(x * 1e3, 3) for x in theirs]}"
    )
    print(f"ratio asv / torch: {a / t:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
