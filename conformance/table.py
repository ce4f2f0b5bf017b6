"""``python -m conformance.table [--write]``: the README's table of built-in adapters.

Produced from the adapter classes themselves, so the table cannot drift from the code;
``--write`` replaces the table in README.md (a test checks that it is current).
"""

from __future__ import annotations

import sys
from pathlib import Path

from conformance.registry import BUILTINS, builtin

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| adapter | framework | path it runs | devices | declared divergences |\n| --- | --- | --- | --- | --- |\n"


def rows() -> str:
    lines = []
    for name in BUILTINS:
        a = builtin(name)
        divergences = "<br>".join(grouped(a.divergences)) or "none"
        framework = f"{a.framework} (`.[{a.extra}]`)" if a.framework else "-"
        devices = ", ".join(a.device_kinds)
        lines.append(f"| `{name}` | {framework} | {a.path} | {devices} | {divergences} |")
    return "\n".join(lines) + "\n"


def grouped(divergences: dict[str, str]) -> list[str]:
    """One line per reason; a reason declared for many cases names how many and one example."""
    by_reason: dict[str, list[str]] = {}
    for pattern, reason in divergences.items():
        by_reason.setdefault(reason, []).append(pattern)
    lines = []
    for reason, patterns in by_reason.items():
        shown = (
            ", ".join(f"`{p}`" for p in patterns)
            if len(patterns) <= 3
            else f"{len(patterns)} patterns, e.g. `{patterns[0]}`"
        )
        lines.append(f"{shown}: {reason}")
    return lines


def current_readme_table(text: str) -> str:
    start = text.index(HEADER) + len(HEADER)
    end = text.index("\n\n", start) + 1
    return text[start:end]


def main(argv: list[str]) -> int:
    table = rows()
    if "--write" in argv:
        text = README.read_text()
        README.write_text(text.replace(current_readme_table(text), table))
    else:
        sys.stdout.write(HEADER + table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
