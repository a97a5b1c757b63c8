"""The Kafka release the launcher runs and its jars: the pom, its version, the jar cache.

The pom (``pom.xml``, shipped beside this module as package data, so an installed wheel has
it; ``deploy/kafka/pom.xml`` in a checkout is a link to it) pins ``kafka.version``.
``LOWMARK_KAFKA_POM`` (or an explicit ``pom`` argument, ``lowmark kafka --pom``) runs another
pom instead. ``mvn dependency:copy-dependencies`` on it fills the jar cache
``${LOWMARK_CACHE:-~/.cache/lowmark}/kafka/<version>/libs`` once, shared by every cluster;
``libs.complete`` is written only after a complete fetch, so an interrupted fetch is redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from connectors.embedded_kafka.procs import last_lines, read_text
from pipeline.errors import SetupError

log = logging.getLogger(__name__)

PACKAGED_POM = Path(__file__).resolve().with_name("pom.xml")
POM_ENV = "LOWMARK_KAFKA_POM"
_MAVEN_NS = "{http://maven.apache.org/POM/4.0.0}"


def kafka_pom(pom: Path | str | None = None) -> Path:
    """The pom to use: ``pom`` if given, else ``$LOWMARK_KAFKA_POM``, else the packaged one."""
    chosen = pom or os.environ.get(POM_ENV, "").strip()
    return Path(chosen).expanduser().absolute() if chosen else PACKAGED_POM


def kafka_version(pom: Path | str | None = None) -> str:
    """The Kafka release pinned in the pom (its ``kafka.version`` property)."""
    path = kafka_pom(pom)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise SetupError(f"cannot read the Kafka pom {path}: {exc}. {_pom_fix(path)}") from exc
    node = root.find(f"{_MAVEN_NS}properties/{_MAVEN_NS}kafka.version")
    if node is None or not (node.text or "").strip():
        raise SetupError(f"{path} has no <kafka.version> property. {_pom_fix(path)}")
    return (node.text or "").strip()


def _pom_fix(path: Path) -> str:
    if path == PACKAGED_POM:
        return ("It ships with lowmark: restore it with `git checkout` in a checkout, or "
                f"reinstall lowmark; {POM_ENV}=/path/to/pom.xml runs another pom.")
    return f"Point {POM_ENV} (or --pom) at a readable pom, or unset it to use the packaged one."


def cache_root() -> Path:
    """``$LOWMARK_CACHE`` or ``~/.cache/lowmark``: downloads shared by every checkout."""
    return Path(os.environ.get("LOWMARK_CACHE") or "~/.cache/lowmark").expanduser().absolute()


def jars_dir(version: str | None = None, pom: Path | str | None = None) -> Path:
    """Where the jars of Kafka ``version`` (default: the pom's) live once fetched."""
    return cache_root() / "kafka" / (version or kafka_version(pom)) / "libs"


def ensure_jars(pom: Path | str | None = None, timeout_s: float = 900) -> Path:
    """Return the directory of Kafka's jars, fetching them with mvn the first time.

    Safe against concurrent callers (a lock file) and interruption (the jars are fetched
    into ``libs.partial`` and renamed; the marker names the pom's hash, so editing the pom
    fetches again).
    """
    path = kafka_pom(pom)
    version = kafka_version(path)
    libs = jars_dir(version)
    top = libs.parent
    pom_bytes = path.read_bytes()
    marker_text = f"{version} {hashlib.sha256(pom_bytes).hexdigest()}\n"
    marker = top / "libs.complete"
    if read_text(marker) == marker_text and libs.is_dir():
        return libs
    try:
        top.mkdir(parents=True, exist_ok=True)
        lock = open(top / ".fetch.lock", "a")  # noqa: SIM115 - held across the fetch
    except OSError as exc:
        raise SetupError(
            f"cannot create the Kafka jar cache {top}: {exc}. Set LOWMARK_CACHE to a "
            "writable directory (default ~/.cache/lowmark)."
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_text(marker) == marker_text and libs.is_dir():  # another process fetched it
            return libs
        _mvn_fetch(pom_bytes, version, top, timeout_s)
        marker.write_text(marker_text)
        return libs


def _mvn_fetch(pom_bytes: bytes, version: str, top: Path, timeout_s: float) -> None:
    mvn = shutil.which("mvn")
    if not mvn:
        raise SetupError(
            "mvn (Apache Maven) is not installed; it fetches the Kafka jars from Maven Central "
            "once. Install it with `apt-get install maven`, or run `make deps` as root."
        )
    libs, partial = top / "libs", top / "libs.partial"
    (top / "libs.complete").unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    # mvn writes target/ beside the pom: run on a copy in the cache, not in the checkout
    # (or an installed package, which may not be writable).
    (top / "pom.xml").write_bytes(pom_bytes)
    cmd = [mvn, "-q", "-B", "-f", str(top / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    log.info("fetching Kafka %s jars with mvn into %s", version, libs)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(
            f"mvn did not finish fetching the Kafka jars in {timeout_s:.0f} s. Check that "
            f"Maven Central is reachable, then retry `make kafka-jars`. Command: {shlex.join(cmd)}"
        ) from exc
    if out.returncode != 0 or not (partial / f"kafka_2.13-{version}.jar").is_file():
        output = last_lines(out.stdout + out.stderr)
        raise SetupError(
            f"mvn failed to fetch the Kafka {version} jars (exit {out.returncode}). Check "
            f"network access to Maven Central and ~/.m2/settings.xml, then retry "
            f"`make kafka-jars`.\ncommand: {shlex.join(cmd)}\n{output}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
