"""A roles writer in a process of its own, for tests/topology/test_store.py.

    python -m tests.topology.roles_writer BOOTSTRAP CG EXPECTED TO_SITE W [--hang-at PHASE]
        [--go FILE]

Plans a failover to TO_SITE at cut W from the committed roles of generation EXPECTED and
commits it through ``RolesStore``, retrying while the writer is fenced mid-commit. Prints
``READY`` once started, waits for the file ``--go`` (so several start together), then one
JSON line: ``{"result": "won"|"lost", "generation": ..., "why": ...}``. ``--hang-at``
prints ``AT <phase>`` at that phase of the commit and sleeps there (to be killed -9).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import orjson

from pipeline.errors import RolesConflictError
from pipeline.topology.roles import plan_failover
from pipeline.topology.store import PHASES, RolesStore
from schemas.records import CgRoles


def plan_from(store: RolesStore, cg: str, expected: int, to_site: str, w: int) -> CgRoles:
    """The failover planned from the committed generation ``expected`` (never compacted
    away during a test)."""
    base = next(r for _o, r in store.records(cg) if r.generation == expected)
    return plan_failover(base, cg, to_site, w, {0: w}, True, int(time.time() * 1e6))


def contend(
    store: RolesStore, cg: str, expected: int, to_site: str, w: int, tries: int = 12
) -> dict[str, object]:
    """Commit until won, lost (another writer committed ``expected + 1``) or out of tries."""
    planned = plan_from(store, cg, expected, to_site, w)
    for attempt in range(tries):
        try:
            got = store.commit(cg, expected, planned)
        except RolesConflictError as exc:
            if exc.retriable:
                # fenced mid-commit: back off (exponential, jittered) so that two writers
                # fencing each other in turn leave one of them a quiet window to commit
                time.sleep(random.uniform(0, min(4.0, 0.2 * 2**attempt)))
                continue
            return {"result": "lost", "generation": expected + 1, "why": str(exc)}
        return {"result": "won", "generation": got.generation, "primary": got.primary_site}
    return {"result": "gave up", "generation": expected + 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("cg")
    ap.add_argument("expected", type=int)
    ap.add_argument("to_site")
    ap.add_argument("w", type=int)
    ap.add_argument("--hang-at", choices=PHASES)
    ap.add_argument("--go", type=Path)
    args = ap.parse_args()

    def hook(phase: str) -> None:
        if phase == args.hang_at:
            print(f"AT {phase}", flush=True)
            time.sleep(3600)

    store = RolesStore({"bootstrap.servers": args.bootstrap}, timeout_s=30, phase_hook=hook)
    print("READY", flush=True)
    while args.go is not None and not args.go.exists():
        time.sleep(0.01)
    out = contend(store, args.cg, args.expected, args.to_site, args.w)
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


if __name__ == "__main__":
    main()
