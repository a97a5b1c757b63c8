"""`make lint` fails on a ruff or mypy finding, and .ci/run fails when `make lint` does.

Runs the project's own Makefile and pyproject.toml against a few generated modules in a
temporary tree, so it neither depends on nor changes the state of the real tree. Tries to
break: a type error passing because mypy never ran, or ran without its configuration; the
strict modules (``pipeline/watermark/``) being checked only normally; a ruff finding hiding
the mypy run after it; CI going green on a failing lint.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the venv running the tests has the dev tools: ruff, mypy

CLEAN = {
    "pipeline/__init__.py": '"""p."""\n',
    "pipeline/watermark/__init__.py": '"""w."""\n',
    "pipeline/watermark/state.py": (
        '"""s."""\n\n\ndef fold(a: int, b: int) -> int:\n    return max(a, b)\n'
    ),
    "pipeline/ops/__init__.py": '"""o."""\n',
    "pipeline/ops/tail.py": '"""t."""\n\n\ndef lag(w: int, s: int) -> int:\n    return s - w\n',
    "connectors/__init__.py": '"""c."""\n',
    "schemas/__init__.py": '"""s."""\n',
    "bench/b.py": '"""b."""\n',
}


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["MYPY_CACHE_DIR"] = str(tmp_path.parent / "lint-gate-mypy-cache")  # shared: faster
    return env


def tree(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """The project's Makefile and pyproject.toml over the CLEAN modules, some replaced."""
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    for rel, text in {**CLEAN, **(changes or {})}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def make_lint(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`make lint` with this venv's tools; ``-o`` keeps make from reinstalling the venv."""
    assert (VENV / "bin" / "mypy").exists(), f"no mypy in {VENV}: install the dev extras"
    return subprocess.run(
        ["make", "-s", "lint", f"VENV={VENV}", "-o", str(VENV / ".installed-stamp")],
        cwd=root, env=_env(tmp_path), capture_output=True, text=True, timeout=180, check=False,
    )


def test_lint_passes_on_a_clean_tree(tmp_path: Path) -> None:
    out = make_lint(tree(tmp_path), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout  # mypy ran, over the configured files


def test_lint_fails_on_type_errors_strict_where_configured(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        # an unannotated def: an error only under the strict override for pipeline.watermark
        "pipeline/watermark/state.py": '"""s."""\n\n\ndef fold(a, b):\n    return max(a, b)\n',
        # a plain type error in a normally checked module
        "pipeline/ops/tail.py": '"""t."""\n\nLAG: int = "a lot"\n',
    })
    out = make_lint(root, tmp_path)
    assert out.returncode != 0
    assert "pipeline/watermark/state.py:4: error" in out.stdout, out.stdout
    assert "[no-untyped-def]" in out.stdout
    assert "pipeline/ops/tail.py:3: error" in out.stdout and "[assignment]" in out.stdout


def test_lint_fails_on_ruff_and_still_runs_mypy(tmp_path: Path) -> None:
    root = tree(tmp_path, {"bench/b.py": '"""b."""\n\nimport os\n'})
    out = make_lint(root, tmp_path)
    assert out.returncode != 0
    assert "F401" in out.stdout, out.stdout
    assert "Success: no issues found" in out.stdout  # the ruff finding did not skip mypy


FAKE_MAKE = """#!/usr/bin/env bash
# stands in for make: `make test` reports a green run, `make lint` exits with $LINT_STATUS
case "$1" in
  test) echo "===== 3 passed in 0.10s ====="; echo "outcome gate: OK (fake)"; exit 0 ;;
  lint) echo "fake lint exits $LINT_STATUS"; exit "$LINT_STATUS" ;;
esac
exit 2
"""


@pytest.mark.parametrize(("lint_status", "ci_ok"), [(0, True), (2, False)])
def test_ci_fails_when_lint_fails(tmp_path: Path, lint_status: int, ci_ok: bool) -> None:
    root = tmp_path / "clone"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", root / ".ci" / "run")
    (root / "deploy" / "kafka").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "kafka" / "pom.xml", root / "deploy" / "kafka" / "pom.xml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "make"
    fake.write_text(FAKE_MAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**_env(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "LINT_STATUS": str(lint_status)}
    out = subprocess.run(["bash", str(root / ".ci" / "run")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert "fake lint exits" in out.stdout, out.stdout + out.stderr
    if ci_ok:
        assert out.returncode == 0 and "CI: OK" in out.stdout, out.stdout + out.stderr
    else:
        assert out.returncode == lint_status, out.stdout + out.stderr
        assert f"CI: FAILED: make lint exited {lint_status}" in out.stderr
