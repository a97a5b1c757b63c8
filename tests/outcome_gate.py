"""A pytest plugin: under strict mode (CI, LOWMARK_STRICT=1) every skip, xfail and xpass
must be listed, with its reason, in tests/allowed_skips.txt; any other makes the session
fail (exit status 1) and the summary names it with the reason pytest gave.

Why: a green run has to mean that every test ran. A skip for a missing tool, an xfail for
a removed subcommand or a Kafka fixture that cannot start all look like success in the
exit status; the allow-list is the one reviewed place where "this does not run here" is
accepted, and why.

Allow-list format, one entry a line::

    <node id or pattern>  # <reason, required>

``*`` matches any run of characters (nothing else is special, so ``[param]`` ids match
literally); blank lines and lines starting with ``#`` are comments. Outside strict mode the
plugin only counts; the counts line (``outcomes: passed=...``) is printed either way, and
.ci/run shows it and checks the gate's verdict line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")
COUNTED = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected")
VERDICT = "outcome gate:"  # .ci/run looks for this line: the gate ran and what it said


@dataclass(frozen=True)
class Allowed:
    pattern: str
    reason: str
    where: str  # file:line, for the summary
    regex: re.Pattern[str]

    def matches(self, nodeid: str) -> bool:
        return self.regex.fullmatch(nodeid) is not None


@dataclass(frozen=True)
class NotRun:
    nodeid: str
    kind: str  # skipped | xfailed | xpassed
    reason: str


def parse_allow_list(text: str, source: str = str(ALLOWED_SKIPS)) -> list[Allowed]:
    """Entries of an allow-list; pytest.UsageError for a line without a reason."""
    out: list[Allowed] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(" #")
        pattern, reason = pattern.strip(), reason.strip()
        if not sep or not reason or not pattern:
            raise pytest.UsageError(
                f"{source}:{n}: {raw!r}: an entry is '<node id or pattern>  # <reason>'; "
                "the reason is required"
            )
        regex = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
        out.append(Allowed(pattern, reason, f"{source}:{n}", regex))
    return out


def _reason(report: Any) -> str:
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return str(wasxfail) or "(xfail without a reason)"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


class OutcomeGate:
    """Records what did not run (or was expected to fail); fails the session under strict
    mode when one of them is not allow-listed."""

    def __init__(self, allowed: list[Allowed], strict: bool) -> None:
        self.allowed = allowed
        self.strict = strict
        self.not_run: list[NotRun] = []
        self.violations: list[NotRun] = []
        self.accepted: list[tuple[NotRun, Allowed]] = []

    def _record(self, nodeid: str, kind: str, report: Any) -> None:
        self.not_run.append(NotRun(nodeid, kind, _reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            kind = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            self._record(report.nodeid, kind, report)
        elif report.passed and report.when == "call" and hasattr(report, "wasxfail"):
            self._record(report.nodeid, "xpassed", report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module-level skip or importorskip: none of its tests ran
            self._record(report.nodeid, "skipped", report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        for item in self.not_run:
            entry = next((a for a in self.allowed if a.matches(item.nodeid)), None)
            if entry is None:
                self.violations.append(item)
            else:
                self.accepted.append((item, entry))
        # only turn a success (or "nothing collected") into a failure; keep worse statuses
        if self.strict and self.violations and exitstatus in (
            pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        stats = terminalreporter.stats
        counts = " ".join(f"{k}={len(stats.get(k, ()))}" for k in COUNTED)
        tr = terminalreporter
        tr.write_line(f"outcomes: {counts}")
        if not self.strict:
            tr.write_line(f"{VERDICT} not strict (set CI or LOWMARK_STRICT=1 to enforce "
                          f"{ALLOWED_SKIPS.name})")
            return
        for item, entry in self.accepted:
            tr.write_line(f"allowed {item.kind}: {item.nodeid} -- {entry.reason} "
                          f"({entry.where})")
        if self.violations:
            tr.write_sep("=", f"{len(self.violations)} not allow-listed skip/xfail/xpass",
                         red=True)
            for item in self.violations:
                tr.write_line(f"NOT ALLOWED {item.kind}: {item.nodeid}: {item.reason}")
            tr.write_line(f"{VERDICT} FAILED: strict mode (CI or LOWMARK_STRICT=1) accepts "
                          f"a skip, xfail or xpass only when {ALLOWED_SKIPS} lists it with "
                          "its reason; make the test run, or list it there")
        else:
            tr.write_line(f"{VERDICT} OK (no skip, xfail or xpass but the {len(self.accepted)} "
                          "allow-listed)")


def from_config(strict: bool, path: Path = ALLOWED_SKIPS) -> OutcomeGate:
    text = path.read_text() if path.exists() else ""
    if strict and not path.exists():
        raise pytest.UsageError(f"strict mode needs the allow-list {path}")
    return OutcomeGate(parse_allow_list(text, str(path)), strict)
