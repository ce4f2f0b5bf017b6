"""``python -m mha_conformance [pytest options]``: the whole suite on the adapters you name.

The same as ``pytest -p mha_conformance.plugin --pyargs mha_conformance [options]``: the plugin
(options, parametrization, summary, report) is loaded by name, never automatically, so a project's
own pytest runs and its own ``conformance`` or ``vectors`` modules are never touched::

    python -m mha_conformance --adapter my_package.attention:attention --dtype float32
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

#: What every run of the suite starts with.
PYTEST_ARGS = ("-p", "mha_conformance.plugin", "--pyargs", "mha_conformance", "-p", "no:cacheprovider")


def command(args: Sequence[str] = ()) -> list[str]:
    """The command line that runs the suite in a fresh interpreter (for the audit tools)."""
    return [sys.executable, "-m", "mha_conformance", *args]


def run(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the suite in a subprocess, output captured."""
    return subprocess.run(command(args), capture_output=True, text=True, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    import pytest

    return int(pytest.main([*PYTEST_ARGS, *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
