"""Seeded fuzz of the NBD server over raw sockets: tries to crash it, desynchronise it,
or make it pass a partial write to the export.

Fuzz threads open thousands of connections, each a random chain of handshake and
request scenarios: bad magics, unknown client flags, options and commands, malformed
GO payloads, oversized lengths, out-of-range offsets (up to 2**64 - 1), zero lengths,
pipelined batches answered out of order, truncated packets and disconnects in the middle
of a WRITE payload. Every scenario with a defined answer checks it exactly (error code
and cookie); every read is checked against a model of the export. Meanwhile a
well-behaved pipelining client works on another export and its data must stay correct.
Every WRITE payload is self-describing, and the export wrapper records any write whose
bytes do not match what a client sent whole. At the end: no violation, no unexpected
server error, files equal to the models, and no connection left open. The clients are in
``fuzz_clients.py``, the recording exports and self-describing payloads in ``fuzz_export.py``.

``LOWMARK_FUZZ_SEED`` replays a seed; the torture variant runs much longer. Targeted
raw-socket cases (error mapping, back-pressure, shutdown) are in ``test_nbd_raw_cases.py``.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from connectors.nbd.file_export import FileExport
from tests.connectors.nbd.fuzz_clients import Fuzzer, good_client
from tests.connectors.nbd.fuzz_export import EXPORT_SIZE, RecordingExport
from tests.nbd_helpers import ServerThread
from tests.nbd_raw_client import collect_errors, wait_for


def run_fuzz(tmp_path: Path, seed: int, connections: int, threads: int = 2) -> dict[str, Any]:
    names = [f"fuzz{i}" for i in range(threads)]
    exports: dict[str, Any] = {}
    for name in [*names, "good", "ro"]:
        path = tmp_path / f"{name}.img"
        with path.open("wb") as f:
            f.truncate(EXPORT_SIZE)
        inner = FileExport(path, name, read_only=name == "ro")
        # fuzz1, fuzz3, ... and the good client's export complete asynchronously
        asynchronous = name == "good" or name[-1] in "13579"
        exports[name] = RecordingExport(inner, name != "good", asynchronous)
    good_model = bytearray(EXPORT_SIZE)
    good_errors: list[str] = []
    stop = threading.Event()
    failures: list[BaseException] = []
    with (
        collect_errors("connectors.nbd") as server_errors,
        ServerThread(
            exports,
            max_inflight_per_conn=4,  # small, so pipelines hit the pause/resume path
        ) as srv,
    ):
        good = threading.Thread(
            target=good_client, args=(srv.port, seed, stop, good_model, good_errors)
        )
        good.start()
        fuzzers = [Fuzzer(srv.port, name, seed * 1000 + i, exports) for i, name in enumerate(names)]

        def fuzz(f: Fuzzer) -> None:
            try:
                f.run(connections // threads)
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=fuzz, args=(f,)) for f in fuzzers]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        good.join(60)
        assert not good.is_alive(), "the well-behaved client hung"
        if failures:
            raise AssertionError(f"seed {seed}: {failures[0]}") from failures[0]
        # Connections the fuzzers dropped must all be gone from the server.
        wait_for(
            lambda: srv.call(lambda: srv.server.stats.connections_open) == 0,
            10,
            "the server to close every connection the fuzzers dropped",
        )
        stats = srv.call(srv.server.stats.snapshot)
        loop_errors = list(srv.loop_errors)
    assert not good_errors, good_errors[:5]
    assert not loop_errors, loop_errors[:5]
    assert not [r.getMessage() for r in server_errors], "the server logged internal errors"
    for name, export in exports.items():
        assert not export.violations, (name, export.violations[:5])
    # What the files hold is exactly what the models say.
    assert (tmp_path / "good.img").read_bytes() == good_model
    for f in fuzzers:
        assert (tmp_path / f"{f.name}.img").read_bytes() == f.model, (
            f"{f.name} differs from its model"
        )
    assert stats["connections_open"] == 0, stats
    assert stats["connections_total"] >= connections
    return stats


def fuzz_seed() -> int:
    return int(os.environ.get("LOWMARK_FUZZ_SEED", "0")) or random.randrange(1, 2**31)


def test_fuzz_bounded(tmp_path: Path) -> None:
    seed = fuzz_seed()
    print(f"replay with LOWMARK_FUZZ_SEED={seed}")
    stats = run_fuzz(tmp_path, seed, connections=1000)
    # The fuzz reached every layer: handshake failures, protocol errors, served requests.
    assert stats["handshakes_failed"] > 0
    assert stats["protocol_errors"] > 0
    assert stats["requests"]["write"] > 500 and stats["errors"]["write"] > 0
    assert stats["async_completions"] > 100  # the task path ran, not just the eager one
    assert stats["read_pauses"] > 10  # and the in-flight limit paused reading


@pytest.mark.torture
def test_fuzz_torture(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "torture" not in (request.config.getoption("-m") or ""):
        pytest.skip("40k fuzz connections (~4 min): run with -m torture")
    seed = fuzz_seed()
    print(f"replay with LOWMARK_FUZZ_SEED={seed}")
    run_fuzz(
        tmp_path,
        seed,
        connections=int(os.environ.get("LOWMARK_FUZZ_CONNECTIONS", "40000")),
        threads=4,
    )
