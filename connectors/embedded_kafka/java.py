"""Finding ``java`` and checking it is new enough to run Kafka 4 (Java >= 17)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import SetupError

MIN_JAVA = 17


def find_java() -> str:
    """Path of ``java``: ``$JAVA_HOME/bin/java`` if set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise SetupError(
            f"java is not installed (Kafka needs Java >= {MIN_JAVA}). Install it with "
            "`apt-get install default-jre-headless` or run `make deps` as root."
        )
    return found


def parse_java_major(version_output: str) -> int:
    """Major version from ``java -version`` output (``"17.0.15"`` -> 17, ``"1.8.0"`` -> 8)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        raise SetupError(
            f"cannot tell the Java version from `java -version`: {version_output.strip()!r}. "
            f"Install Java >= {MIN_JAVA}: `apt-get install default-jre-headless`."
        )
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def java_version_text(java: str) -> str:
    """What ``java -version`` prints (on stderr)."""
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"`{java} -version` failed: {exc}. Reinstall Java >= {MIN_JAVA}.") from exc
    return out.stderr + out.stdout


def check_java() -> str:
    """The java binary to use; :class:`SetupError` if it is missing or older than 17."""
    java = find_java()
    major = parse_java_major(java_version_text(java))
    if major < MIN_JAVA:
        raise SetupError(
            f"{java} is Java {major}; Kafka 4 needs Java >= {MIN_JAVA}. Install it with "
            "`apt-get install default-jre-headless` and put it first on PATH "
            "(or set JAVA_HOME)."
        )
    return java
