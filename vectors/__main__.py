"""``python -m mha_conformance.vectors generate|verify [--kernel]``: write or check the golden vectors.

Without ``--kernel``: the committed cases (``vectors/*.safetensors``, ``MANIFEST.json``). With it:
the kernel-scale cases (``vectors/KERNELS.json``): ``generate --kernel`` rewrites the manifest
(the truth, its fingerprint and the ensemble's baselines; hours at full size), ``verify --kernel``
builds each case here and checks its inputs and truth (minutes; the truths are cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mha_conformance.vectors import golden, kernel_manifest, materialize
from mha_conformance.vectors.generate import generate
from mha_conformance.vectors.verify import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.vectors",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["generate", "verify"])
    parser.add_argument("--root", type=Path, default=golden.VECTORS_DIR, help="vector folder")
    parser.add_argument("--kernel", action="store_true", help="the kernel-scale cases (vectors/KERNELS.json)")
    parser.add_argument("--case", action="append", help="generate or verify only this case (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-case progress")
    parser.add_argument("--json", type=Path, help="verify: also write the problems and margins to this file")
    args = parser.parse_args(argv)
    say = None if args.quiet else (lambda line: print(line, flush=True))
    start = time.perf_counter()
    manifest_path = args.root / materialize.KERNEL_MANIFEST.name
    if args.command == "generate":
        if args.kernel:
            manifest = kernel_manifest.generate_kernel_manifest(manifest_path, only=args.case, progress=say)
            print(f"wrote {len(manifest['cases'])} kernel-scale cases in {time.perf_counter() - start:.1f} s")
            return 0
        manifest = generate(args.root, only=args.case, progress=say)
        total = sum(e["bytes"] for e in manifest["cases"].values())
        print(
            f"wrote {len(manifest['cases'])} cases, {total / 1e6:.1f} MB, "
            f"in {time.perf_counter() - start:.1f} s"
        )
        return 0
    margins: dict[str, tuple[float, str]] = {}
    if args.kernel:
        problems = kernel_manifest.verify_kernel_cases(manifest_path, only=args.case, progress=say)
    else:
        problems = verify(args.root, progress=say, only=args.case, margins=margins)
    for line in problems:
        print(f"ERROR: {line}", file=sys.stderr)
    worst = "; ".join(f"{kind} {ratio:.3g} ({where})" for kind, (ratio, where) in sorted(margins.items()))
    tail = f"; worst error over its bound: {worst}" if worst else ""
    print(f"verify: {len(problems)} problem(s) in {time.perf_counter() - start:.1f} s{tail}")
    if args.json:
        args.json.write_text(json.dumps({"problems": problems, "margins": margins}, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
