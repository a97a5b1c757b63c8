"""The code's map (docs/ARCHITECTURE.md, pipeline/__init__.py) held against the code.

Tries to break: a room importing a room after it on the data path (the applier reaching
into ops/, the interceptor into backup/), ``confluent_kafka`` imported outside the Kafka
connector, a module grown past 650 lines, a room without a docstring saying what it may
import, and knowledge that must live in one place (the partition-end sentinel, the site
layout's catalog name) written out again somewhere else.

Imports are read from the source with ``ast``, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = (
    "pipeline.errors",
    "pipeline.logs",
    "pipeline.fault_streak",
    "pipeline.fsutil",
    "pipeline.timesource",
    "pipeline.site",
    "pipeline.snapshot_store",
)
BELOW_ROOMS = ("schemas", "connectors")

# What each room may import besides itself, the shared ground and the layers below the
# rooms (pipeline/__init__.py and each room's docstring say the same in words).
ROOM_MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "topology": (),
    "primary": ("pipeline.topology", "pipeline.watermark.state"),
    "watermark": ("pipeline.topology",),
    "backup": ("pipeline.topology", "pipeline.watermark"),
    "ops": ("pipeline.topology", "pipeline.primary", "pipeline.watermark", "pipeline.backup"),
    "app": ("pipeline",),
}
KAFKA_CLIENT_HOMES = ("connectors/kafka/", "connectors/embedded_kafka/")
SIZE_LIMITED = ("pipeline", "connectors", "schemas", "bench", "tests")
MAX_LINES = 650


def _sources(*tops: str) -> Iterator[Path]:
    for top in tops:
        yield from sorted((ROOT / top).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, including ``from pkg import module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from pipeline import status` imports the module pipeline.status
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _project(module: str) -> bool:
    return any(_is_under(module, top) for top in ("pipeline", *BELOW_ROOMS, "tests", "bench"))


def _existing(module: str) -> bool:
    """Whether ``module`` names a module or package of the tree (not a name inside one)."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layering_violations(path: Path) -> list[str]:
    """Imports of ``path`` that its place in the tree forbids, as readable lines."""
    me = _module_name(path)
    parts = me.split(".")
    bad = []
    for module in sorted(imported_modules(path)):
        if not _project(module) or not _existing(module):
            continue
        if parts[0] in BELOW_ROOMS:
            allowed = any(_is_under(module, ok) for ok in (*SHARED, *BELOW_ROOMS))
            if parts[0] == "schemas":
                allowed = allowed and not _is_under(module, "connectors")
        elif parts[0] == "pipeline" and len(parts) >= 2 and parts[1] in ROOM_MAY_IMPORT:
            room = parts[1]
            mine = (*SHARED, f"pipeline.{room}", *ROOM_MAY_IMPORT[room])
            allowed = module == "pipeline" or not _is_under(module, "pipeline") or any(
                _is_under(module, ok) for ok in mine
            )
        elif parts[0] == "pipeline":  # the shared ground itself
            allowed = not _is_under(module, "pipeline") or any(
                _is_under(module, ok) for ok in SHARED
            )
        else:
            continue
        if not allowed:
            bad.append(f"{_rel(path)} imports {module}")
    return bad


def test_rooms_import_only_what_their_place_allows() -> None:
    bad = [line for p in _sources("pipeline", *BELOW_ROOMS) for line in layering_violations(p)]
    assert not bad, "imports against the map (pipeline/__init__.py):\n" + "\n".join(bad)


def test_the_layering_check_catches_a_backward_import(tmp_path: Path) -> None:
    """The checker itself: a backup module importing ops must be reported."""
    probe = ROOT / "pipeline" / "backup" / "_layout_probe.py"
    probe.write_text("from pipeline.ops.replay import replay\nimport pipeline.watermark.state\n")
    try:
        assert layering_violations(probe) == [
            "pipeline/backup/_layout_probe.py imports pipeline.ops.replay"
        ]
    finally:
        probe.unlink()


def test_confluent_kafka_lives_only_behind_the_kafka_connector() -> None:
    bad = [
        _rel(path)
        for path in _sources("pipeline", "connectors", "schemas")
        if any(_is_under(m, "confluent_kafka") for m in imported_modules(path))
        and not _rel(path).startswith(KAFKA_CLIENT_HOMES)
    ]
    assert not bad, f"confluent_kafka imported outside connectors/kafka: {bad}"


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        _rel(path): n
        for path in _sources(*SIZE_LIMITED)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


@pytest.mark.parametrize("room", sorted(ROOM_MAY_IMPORT))
def test_every_room_says_what_it_owns_and_may_import(room: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / room / "__init__.py").read_text()))
    assert doc and "May import" in doc, f"pipeline/{room}/__init__.py needs its docstring"


@pytest.mark.parametrize(
    ("needle", "why"),
    [
        ("-191", "the partition-end sentinel is named once, in connectors/kafka"),
        ('"volumes.json"', "a site's catalog file is known to SiteDir alone"),
    ],
)
def test_knowledge_that_lives_in_one_place(needle: str, why: str) -> None:
    sources = _sources("pipeline", "connectors", "schemas")
    homes = [_rel(p) for p in sources if needle in p.read_text()]
    assert len(homes) <= 1, f"{why}; found in {homes}"
