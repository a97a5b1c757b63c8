"""What a test needs from the machine (a Debian tool, a broker, an engine), and what happens
when it is not there.

Locally a missing prerequisite skips the test, saying how to install it. Under CI (``CI``
set, as .ci/run does) or ``LOWMARK_STRICT=1`` it fails the test instead: there `make test`
has installed everything first, so a skip would only hide a broken install and leave the
run green with the test never run.

Tool names map to Debian packages through the ``tools=(...)`` table of
deploy/install-tools.sh, the script `make tools` runs: a test cannot ask for a tool that
`make tools` would not install (``require_tool`` fails on a name missing from the table).
"""

from __future__ import annotations

import os
import re
import shutil
from functools import cache
from pathlib import Path
from typing import NoReturn

import pytest

INSTALL_TOOLS = Path(__file__).resolve().parents[1] / "deploy" / "install-tools.sh"
_FALSE = {"", "0", "false", "no", "off"}


def strict_mode() -> bool:
    """True under CI or LOWMARK_STRICT=1: every test must run, a missing dependency fails."""
    return any(
        os.environ.get(var, "").strip().lower() not in _FALSE for var in ("CI", "LOWMARK_STRICT")
    )


def unavailable(message: str) -> NoReturn:
    """Skip for a missing prerequisite, or fail under strict mode (CI, LOWMARK_STRICT=1)."""
    if strict_mode():
        pytest.fail(f"{message} [strict mode (CI or LOWMARK_STRICT=1): a missing prerequisite "
                    "fails instead of skipping]", pytrace=False)
    pytest.skip(message)


@cache
def tool_packages() -> dict[str, str]:
    """command -> Debian package, as deploy/install-tools.sh lists them."""
    text = INSTALL_TOOLS.read_text()
    table = re.search(r"^tools=\((.*?)^\)", text, re.S | re.M)
    if table is None:
        raise AssertionError(f"no tools=(...) table in {INSTALL_TOOLS}")
    return dict(re.findall(r'"([^":\s]+):([^"\s]+)"', table.group(1)))


def require_tools(*names: str) -> list[str]:
    """Paths of the Debian client tools ``names``; see :func:`unavailable` for when one is
    missing (every missing one is named, with its package)."""
    packages = tool_packages()
    unknown = [n for n in names if n not in packages]
    if unknown:
        # a programming error, not a missing install: fails even outside strict mode
        pytest.fail(f"{unknown} are not in the tools table of {INSTALL_TOOLS.name}; add "
                    "them there so `make tools` installs them", pytrace=False)
    found = {n: shutil.which(n) for n in names}
    missing = [n for n, path in found.items() if path is None]
    if missing:
        pkgs = sorted({packages[n] for n in missing})
        unavailable(f"{', '.join(missing)} not installed: apt-get install {' '.join(pkgs)} "
                    "(or `make tools` as root)")
    return [path for path in found.values() if path is not None]


def require_tool(name: str) -> str:
    """Path of one Debian client tool (see :func:`require_tools`)."""
    return require_tools(name)[0]
