"""``RolesStore`` on a real broker, through the real clients.

Tries to break the compare-and-set on Kafka: two writers (threads, then processes) that
commit a change from the same generation at the same time must never both win, nor leave
two records of one generation; a writer killed -9 between taking the writer's id and
committing must leave nothing visible and must not block the next writer; a corrupt or
misplaced value under a roles key must be skipped and reported, never trusted (not even
when it claims a higher generation); a re-run of a committed change must complete without
a second generation; ``lowmark roles`` and ``lowmark status`` must show what is recorded.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from connectors.kafka.producer import Producer
from connectors.kafka.topics import CONFIG_TOPIC, ensure_topics, roles_key
from pipeline.app.cli import main
from pipeline.errors import RolesConflictError, RolesError
from pipeline.ops.status import cg_status, render
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from schemas import codec
from tests.topology.roles_writer import contend

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


def _init(conf: dict[str, str], cg: str) -> RolesStore:
    store = RolesStore(conf, timeout_s=30)
    store.commit(cg, None, initial_roles(cg, "main", now_us=1))
    return store


def _no_generation_twice(store: RolesStore, cg: str) -> list[int]:
    gens = [r.generation for _o, r in store.records(cg)]
    assert len(gens) == len(set(gens)), f"two records of one generation: {gens}"
    return gens


def test_commit_latest_and_an_idempotent_rerun(
    kafka_conf: dict[str, str], unique_name: str
) -> None:
    cg = unique_name
    store = RolesStore(kafka_conf, timeout_s=30)
    assert store.latest(cg) is None
    g0 = initial_roles(cg, "main", now_us=1)
    assert store.commit(cg, None, g0) == g0 and store.latest(cg) == g0
    g1 = plan_failover(g0, cg, "dr", 100, {0: 7}, True, 5)
    assert store.commit(cg, 0, g1) == g1 and store.latest(cg) == g1
    # the same failover planned again after a crash: completes, no second generation
    rerun = plan_failover(g0, cg, "dr", 100, {0: 7}, True, 99)
    assert store.commit(cg, 0, rerun) == g1
    with pytest.raises(RolesConflictError, match=r"expected generation 0.*generation 1") as e:
        store.commit(cg, 0, plan_failover(g0, cg, "dr2", 100, {0: 7}, True, 6))
    assert not e.value.retriable
    with pytest.raises(RolesError, match="successor"):
        store.commit(cg, 3, g1)
    assert _no_generation_twice(store, cg) == [0, 1]
    assert RolesStore(kafka_conf).latest(f"{cg}-other") is None, "roles are per CG"


def test_two_threads_never_both_win(kafka_conf: dict[str, str], unique_name: str) -> None:
    cg = unique_name
    _init(kafka_conf, cg)

    def writer(
        site: str, expected: int, barrier: threading.Barrier, results: dict[str, Any]
    ) -> None:
        store = RolesStore(kafka_conf, timeout_s=30)  # each thread its own clients
        barrier.wait()
        results[site] = contend(store, cg, expected, site, 10 * (expected + 1))

    for expected in range(3):
        results: dict[str, dict[str, Any]] = {}
        barrier = threading.Barrier(2)
        sites = [f"a{expected}", f"b{expected}"]
        threads = [
            threading.Thread(target=writer, args=(s, expected, barrier, results)) for s in sites
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        outcomes = sorted(r["result"] for r in results.values())
        assert outcomes == ["lost", "won"], results
        winner = next(s for s, r in results.items() if r["result"] == "won")
        latest = RolesStore(kafka_conf).latest(cg)
        assert latest is not None and latest.generation == expected + 1
        assert latest.primary_site == winner
    assert _no_generation_twice(RolesStore(kafka_conf), cg) == [0, 1, 2, 3]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.topology.roles_writer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"{got!r} instead of {line!r}; stderr: {err[-3000:]}")


def test_two_processes_never_both_win(
    kafka_conf: dict[str, str], unique_name: str, tmp_path: Path
) -> None:
    cg = unique_name
    _init(kafka_conf, cg)
    bootstrap = kafka_conf["bootstrap.servers"]
    go = tmp_path / "go"
    procs = [_spawn(bootstrap, cg, "0", site, "50", "--go", str(go)) for site in ("p1", "p2")]
    try:
        for p in procs:
            _expect(p, "READY")
        go.touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(orjson.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(o["result"] for o in outs) == ["lost", "won"], outs
    latest = RolesStore(kafka_conf).latest(cg)
    assert latest is not None and latest.generation == 1
    assert latest.primary_site == next(o["primary"] for o in outs if o["result"] == "won")
    assert _no_generation_twice(RolesStore(kafka_conf), cg) == [0, 1]


@pytest.mark.parametrize("phase", ["checked", "produced"])
def test_a_writer_killed_mid_commit_leaves_nothing_and_blocks_no_one(
    kafka_conf: dict[str, str], unique_name: str, phase: str
) -> None:
    cg = unique_name
    store = _init(kafka_conf, cg)
    proc = _spawn(kafka_conf["bootstrap.servers"], cg, "0", "ghost", "70", "--hang-at", phase)
    try:
        _expect(proc, "READY")
        _expect(proc, f"AT {phase}")
        # while it hangs with its transaction open, readers see the committed roles only
        latest = store.latest(cg)
        assert latest is not None and latest.generation == 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the next writer takes the id (aborting what the dead one left open) and proceeds
    won = contend(RolesStore(kafka_conf, timeout_s=30), cg, 0, "dr", 80)
    assert won["result"] == "won", won
    latest = store.latest(cg)
    assert latest is not None and (latest.generation, latest.primary_site) == (1, "dr")
    assert all(r.primary_site != "ghost" for _o, r in store.records(cg)), "half-written"
    assert _no_generation_twice(store, cg) == [0, 1]


def test_a_corrupt_or_misplaced_value_is_skipped_and_reported(
    kafka_conf: dict[str, str], unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    cg = unique_name
    store = _init(kafka_conf, cg)
    g0 = store.latest(cg)
    assert g0 is not None
    liar = plan_failover(g0, cg, "liar", 5, {}, True, 2)
    for _ in range(4):
        to = "main" if liar.primary_site == "liar" else "liar"
        liar = plan_failover(liar, cg, to, 5, {}, True, 2)
    flipped = bytearray(codec.encode(liar))
    flipped[-3] ^= 0x01  # a higher generation, but its crc no longer matches
    other = initial_roles(f"{cg}-x", "elsewhere", now_us=1)  # another CG's, under our key
    p = Producer({"bootstrap.servers": kafka_conf["bootstrap.servers"]})
    for value in (b"\x00garbage", bytes(flipped), codec.encode(other)):
        p.produce(CONFIG_TOPIC, value, key=roles_key(cg))
    p.produce(CONFIG_TOPIC, None, key=roles_key(cg))  # a tombstone: not a change of roles
    assert p.flush(30) == 0
    fresh = RolesStore(kafka_conf, timeout_s=30)
    with caplog.at_level(logging.WARNING, logger="lowmark.topology"):
        assert fresh.latest(cg) == g0
    assert fresh.skipped == 3
    assert sum("cannot be trusted" in r.getMessage() for r in caplog.records) == 3
    # and a writer is not fooled either: the next generation is still 1
    g1 = plan_failover(g0, cg, "dr", 9, {}, False, 3)
    assert fresh.commit(cg, 0, g1) == g1 and fresh.latest(cg) == g1
    bs = ["--cg", cg, "--bootstrap-servers", kafka_conf["bootstrap.servers"]]
    res = CliRunner().invoke(main, ["roles", "show", *bs, "--json"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout)["skipped_records"] == 3


def test_roles_cli_and_status(kafka_conf: dict[str, str], unique_name: str) -> None:
    cg = unique_name
    bs = ["--cg", cg, "--bootstrap-servers", kafka_conf["bootstrap.servers"]]
    runner = CliRunner()
    res = runner.invoke(main, ["roles", "show", *bs])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"consistency group {cg}: generation 0, no roles recorded"
    res = runner.invoke(main, ["roles", "show", *bs, "--json"])
    shown = orjson.loads(res.output)
    assert (shown["generation"], shown["primary_site"], shown["recorded"]) == (0, None, False)

    ensure_topics(kafka_conf, cg)
    st = cg_status(kafka_conf, cg)
    assert (st["generation"], st["primary_site"]) == (0, None)
    assert "  roles " not in render(st)

    res = runner.invoke(main, ["roles", "init", *bs, "--primary-site", "main"])
    assert res.exit_code == 0, res.output
    assert "generation 0, primary main recorded" in res.output
    # a second init is refused by the real command, with a message and exit code 2
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", "roles", "init", *bs, "--primary-site", "dr"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "already has roles (generation 0, primary 'main')" in proc.stderr

    store = RolesStore(kafka_conf)
    g0 = store.latest(cg)
    assert g0 is not None
    store.commit(cg, 0, plan_failover(g0, cg, "dr", 42, {0: 3}, True, 9))
    res = runner.invoke(main, ["roles", "show", *bs])
    assert res.exit_code == 0, res.output
    assert f"consistency group {cg}: generation 1, primary dr" in res.output
    assert "generation 1: FAILOVER main -> dr at W 42, forced" in res.output
    shown = orjson.loads(runner.invoke(main, ["roles", "show", *bs, "--json"]).output)
    assert shown["generation"] == 1 and shown["base_offsets"] == {"0": 3}
    assert shown["history"][0]["kind"] == "FAILOVER"
    st = cg_status(kafka_conf, cg)
    assert (st["generation"], st["primary_site"]) == (1, "dr")
    assert "roles    generation 1, primary dr" in render(st)
    res = runner.invoke(main, ["status", *bs, "--json"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.output)["generation"] == 1
