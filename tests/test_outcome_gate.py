"""The strict-mode gate and the prerequisite helpers, on generated test files (pytester).

Tries to break: a skip, xfail or xpass nobody listed passing as green; a module-level skip
slipping past a gate that only looks at tests; ``[param]`` ids read as glob classes; an
entry without a reason; a missing tool skipping under CI, or failing without naming the
package that provides it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.outcome_gate import OutcomeGate, parse_allow_list
from tests.prereqs import require_tool, require_tools, strict_mode, tool_packages

SAMPLE = """
import pytest

def test_ok():
    pass

def test_skips():
    pytest.skip("no frobnicator here")

@pytest.mark.xfail(reason="known bug 42", strict=False)
def test_xfails():
    assert False

@pytest.mark.xfail(reason="flaky limit", strict=False)
def test_xpasses():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    if n == 2:
        pytest.skip("two is not supported")
"""

EVERYTHING = """
test_sample.py::test_skips  # the frobnicator is not on CI machines
test_sample.py::test_xfails  # bug 42, tracked
test_sample.py::test_xpasses  # a race, may pass
test_sample.py::test_param[2]  # two is out of scope
"""


def gate(allow: str, strict: bool = True) -> OutcomeGate:
    return OutcomeGate(parse_allow_list(allow, "allowed_skips.txt"), strict)


def test_an_unlisted_skip_fails_the_session_and_is_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample=SAMPLE)
    listed = "\n".join(line for line in EVERYTHING.splitlines() if "test_skips" not in line)
    result = pytester.runpytest(plugins=[gate(listed)])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*outcomes: passed=2 failed=0 error=0 skipped=2 xfailed=1 xpassed=1 deselected=0*",
        "*NOT ALLOWED skipped: test_sample.py::test_skips: Skipped: no frobnicator here*",
        "*outcome gate: FAILED*",
    ])
    result.stdout.no_fnmatch_line("*NOT ALLOWED*test_xfails*")


def test_every_kind_needs_an_entry(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample=SAMPLE)
    result = pytester.runpytest(plugins=[gate("")])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*4 not allow-listed*",
        "*NOT ALLOWED skipped: test_sample.py::test_skips*",
        "*NOT ALLOWED xfailed: test_sample.py::test_xfails: known bug 42*",
        "*NOT ALLOWED xpassed: test_sample.py::test_xpasses: flaky limit*",
        "*NOT ALLOWED skipped: test_sample.py::test_param[[]2[]]: Skipped: two is not*",
    ])


def test_listed_outcomes_pass_with_their_reasons_shown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample=SAMPLE)
    result = pytester.runpytest(plugins=[gate(EVERYTHING)])
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([
        "*allowed skipped: test_sample.py::test_skips -- the frobnicator is not on CI*",
        "*outcome gate: OK (no skip, xfail or xpass but the 4 allow-listed)*",
    ])


def test_outside_strict_mode_the_gate_only_counts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample=SAMPLE)
    result = pytester.runpytest(plugins=[gate("", strict=False)])
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*outcomes: passed=2*", "*outcome gate: not strict*"])


def test_a_failure_stays_a_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample="def test_bad():\n    assert False\n")
    result = pytester.runpytest(plugins=[gate("")])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*outcomes: passed=0 failed=1*", "*outcome gate: OK*"])


def test_a_module_level_skip_is_caught(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mod="import pytest\npytest.importorskip('no_such_module_x')\n"
                        "def test_never():\n    pass\n")
    result = pytester.runpytest(plugins=[gate("")])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*NOT ALLOWED skipped: test_mod.py: *no_such_module_x*"])


def test_patterns_use_star_only() -> None:
    (entry,) = parse_allow_list("tests/t.py::test_x[*]  # any id\n")
    assert entry.matches("tests/t.py::test_x[a-b]")
    assert not entry.matches("tests/t.py::test_y[a]")
    (literal,) = parse_allow_list("t.py::test_p[ab]  # one id\n")
    assert literal.matches("t.py::test_p[ab]") and not literal.matches("t.py::test_p[a]")


@pytest.mark.parametrize("line", ["t.py::test_x", "t.py::test_x  #", "  # only a reason"])
def test_an_entry_without_a_reason_is_refused(line: str) -> None:
    if line.strip().startswith("#"):  # a comment line is not an entry at all
        assert parse_allow_list(line) == []
        return
    with pytest.raises(pytest.UsageError, match="the reason is required"):
        parse_allow_list(line + "\n")


def test_the_repo_allow_list_parses_and_every_entry_has_a_reason() -> None:
    path = Path(__file__).with_name("allowed_skips.txt")
    entries = parse_allow_list(path.read_text(), str(path))
    assert entries and all(len(e.reason) > 20 for e in entries)


# ---------------------------------------------------------------- prerequisites


def _no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, strict: bool) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no tool is found
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LOWMARK_STRICT", raising=False)
    if strict:
        monkeypatch.setenv("LOWMARK_STRICT", "1")


def test_a_missing_tool_fails_under_strict_naming_its_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_tools(monkeypatch, tmp_path, strict=True)
    with pytest.raises(pytest.fail.Exception) as failed:
        require_tools("kcat", "qemu-io")
    message = str(failed.value)
    assert "kcat, qemu-io not installed: apt-get install kcat qemu-utils" in message
    assert "strict mode" in message


def test_a_missing_tool_skips_outside_strict(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_tools(monkeypatch, tmp_path, strict=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install kcat"):
        require_tool("kcat")


def test_a_tool_missing_from_install_tools_always_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"install-tools\.sh"):
        require_tool("definitely-not-a-tool")


@pytest.mark.parametrize(("ci", "strict", "expected"), [
    ("", "", False), ("true", "", True), ("0", "", False), ("false", "1", True), ("", "1", True),
])
def test_strict_mode_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, ci: str, strict: str, expected: bool
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("LOWMARK_STRICT", strict)
    assert strict_mode() is expected


def test_install_tools_covers_what_the_tests_run() -> None:
    # every client the tests drive, including the TLS tests' openssl and the libnbd shell
    assert {"fio", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbdsh", "nbdkit", "kcat",
            "openssl", "java", "mvn"} <= set(tool_packages())
    assert tool_packages()["openssl"] == "openssl"
