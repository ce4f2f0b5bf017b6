"""A clean install: the wheel claims one import name, ``mha_conformance``, and validates a user's
adapter from a fresh virtualenv beside a project that has its own ``conformance`` and ``vectors``.

Slow-ish (builds the wheel from a clean copy of the checkout, makes a virtualenv and pip-installs
the wheel with its dependencies: about 15 s here), so it runs once for every test in this module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_suite import readme_example

ROOT = Path(__file__).resolve().parents[1]


def source_files() -> list[str]:
    """The checkout's files as a fresh clone would have them (tracked, plus new files not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a clean copy (no stale build/ folder can leak into it)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the sources from")
    tree = tmp_path_factory.mktemp("source")
    for name in source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    run = subprocess.run([*build, "-w", str(out), str(tree)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (found,) = out.glob("mha_conformance-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv (no system site-packages) with only the wheel and its dependencies."""
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    run = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return python


@pytest.fixture()
def user_project(tmp_path) -> Path:
    """A user's project: their own ``conformance`` package and ``vectors`` module, and the README's
    adapter, which imports both (so a clash with the suite's names would break it)."""
    (tmp_path / "conformance").mkdir()
    (tmp_path / "conformance" / "__init__.py").write_text('MINE = "the user\'s conformance package"\n')
    (tmp_path / "vectors.py").write_text('MINE = "the user\'s vectors module"\n')
    guard = "import conformance\nimport vectors\n\nassert conformance.MINE and vectors.MINE\n"
    (tmp_path / "my_attention.py").write_text(guard + readme_example())
    return tmp_path


def test_wheel_claims_one_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"mha_conformance", f"{wheel.name.split('-py3')[0]}.dist-info"}, top
    cases = [n for n in names if n.startswith("mha_conformance/vectors/") and n.endswith(".safetensors")]
    manifest = json.loads((ROOT / "vectors" / "MANIFEST.json").read_text())
    assert len(cases) == len(manifest["cases"]) > 0, "the golden vectors must ship in the wheel"
    assert "mha_conformance/vectors/MANIFEST.json" in names


def suite(python: Path, project: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m mha_conformance`` in the user's project, with nothing of the checkout in sight."""
    command = [str(python), "-m", "mha_conformance", "-p", "no:cacheprovider", "-q", *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(project)}
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)


def test_installed_suite_validates_an_adapter_beside_the_users_own_modules(venv, user_project):
    run = suite(venv, user_project, "--adapter", "my_attention:attention", "--dtype", "float32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed > 50 and "failed" not in summary, summary
    # The user's names still import as theirs, in the venv's Python from their project folder.
    check = "import conformance, vectors, mha_conformance; print(conformance.MINE, '|', vectors.MINE)"
    mine = subprocess.run([str(venv), "-c", check], cwd=user_project, capture_output=True, text=True)
    assert mine.stdout.strip() == "the user's conformance package | the user's vectors module", mine.stderr


def test_installed_suite_fails_a_wrong_adapter(venv, user_project):
    """The same install fails an adapter with the scale deleted: the verdict can go both ways."""
    source = (user_project / "my_attention.py").read_text()
    broken = source.replace("* scale\n", "\n")
    assert broken != source
    (user_project / "my_attention.py").write_text(broken)
    run = suite(
        venv, user_project, "--adapter", "my_attention:attention", "--dtype", "float32", "-k", "golden"
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert (
        "Reproduce: python -m mha_conformance -k 'test_golden' --adapter my_attention:attention" in run.stdout
    )
