"""One summary table for every fault-injecting run (issue 16 item 5).

A test that injects faults calls :func:`record` once with what it did and what it checked;
the session prints one table at its end (``tests/conftest.py``), under ``make test`` (the
short runs) and ``make torture`` (the long ones), and writes it as JSON to
``$LOWMARK_TORTURE_JSON`` when that is set (``make torture`` sets it to
``bench/results/torture.json``).

A row is counted only after its test checked what it recorded: call ``record`` after the
assertions, so a failing run never reports "0 violations".
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson


@dataclass
class Row:
    name: str
    #: faults injected (kills, pauses, partitions, crashes, bad records, ...)
    faults: int
    #: acknowledged writes (or records, bytes, cuts: say which in ``checked_what``) checked
    checked: int
    violations: int
    checked_what: str = "acknowledged writes"
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


_rows: list[Row] = []
_lock = threading.Lock()


def record(
    name: str,
    *,
    faults: int,
    checked: int,
    violations: int = 0,
    checked_what: str = "acknowledged writes",
    seconds: float = 0.0,
    **detail: Any,
) -> None:
    with _lock:
        _rows.append(Row(name, faults, checked, violations, checked_what, seconds, detail))


def rows() -> list[Row]:
    with _lock:
        return list(_rows)


def table(found: list[Row]) -> list[str]:
    if not found:
        return []
    width = max(len("run"), *(len(r.name) for r in found))
    lines = [
        f"{'run':<{width}}  {'faults':>8}  {'checked':>10}  {'violations':>10}  {'s':>7}  what",
    ]
    for r in found:
        lines.append(
            f"{r.name:<{width}}  {r.faults:>8}  {r.checked:>10}  {r.violations:>10}  "
            f"{r.seconds:>7.1f}  {r.checked_what}"
        )
    total_f = sum(r.faults for r in found)
    total_v = sum(r.violations for r in found)
    lines.append(f"{'total':<{width}}  {total_f:>8}  {'':>10}  {total_v:>10}")
    return lines


def write_json(found: list[Row]) -> Path | None:
    target = os.environ.get("LOWMARK_TORTURE_JSON", "").strip()
    if not target or not found:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps([asdict(r) for r in found], option=orjson.OPT_INDENT_2))
    return path
