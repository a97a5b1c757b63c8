"""The launcher works from an installed wheel: its pom ships inside the package.

Builds the wheel from a copy of the checkout (so the worktree gets no build/ or egg-info),
checks the pom is in it byte for byte, then imports the launcher from the unpacked wheel in
an interpreter that sees neither the checkout nor site-packages, run from a directory
outside the repository, and reads the Kafka version from the packaged pom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from connectors.embedded_kafka.jars import PACKAGED_POM, kafka_version
from tests.prereqs import unavailable

ROOT = Path(__file__).resolve().parents[3]
# pip's words when the isolated build environment cannot be fetched (no index reachable)
_OFFLINE = ("No matching distribution found", "Could not find a version that satisfies",
            "NewConnectionError", "Temporary failure in name resolution")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("pipeline", "connectors", "schemas"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600, check=False)
    if build.returncode != 0:
        text = build.stdout + build.stderr
        if any(word in text for word in _OFFLINE):
            unavailable("pip cannot fetch setuptools for the isolated wheel build "
                        f"(no package index reachable):\n{text[-2000:]}")
        pytest.fail(f"building the wheel failed (exit {build.returncode}):\n{text[-4000:]}")
    wheels = list(out.glob("lowmark-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_pom_and_every_launcher_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert whl.read("connectors/embedded_kafka/pom.xml") == PACKAGED_POM.read_bytes()
    package = ROOT / "connectors" / "embedded_kafka"
    modules = {f"connectors/embedded_kafka/{p.name}" for p in package.glob("*.py")}
    assert modules and modules <= names, sorted(modules - names)


def test_the_installed_launcher_reads_the_packaged_pom(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)  # a pure-Python wheel unpacked is its installed layout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = f"""
import json, sys
sys.path.insert(0, {str(site)!r})
from connectors.embedded_kafka import cluster, jars
print(json.dumps({{"path": sys.path, "module": jars.__file__, "pom": str(jars.kafka_pom()),
                  "version": jars.kafka_version(), "cluster": cluster.__file__}}))
"""
    # -I: no PYTHONPATH, no user site, no script directory; -S: no site-packages either
    run = subprocess.run([sys.executable, "-I", "-S", "-c", probe], cwd=elsewhere,
                         env={"PATH": "/usr/bin:/bin", "LOWMARK_KAFKA_POM": ""},
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert not [p for p in seen["path"] if p and Path(p).resolve() == ROOT]
    assert Path(seen["module"]).is_relative_to(site)
    assert Path(seen["cluster"]).is_relative_to(site)
    assert Path(seen["pom"]) == (site / "connectors" / "embedded_kafka" / "pom.xml").resolve()
    assert seen["version"] == kafka_version()
