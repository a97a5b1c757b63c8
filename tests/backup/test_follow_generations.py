"""A backup site follows generations on a real broker (issue #12: items 2 and 4).

Tries to break: a site applying generation 0 while a failover commits generation 1 at
base_w; the old primary's tail keeps coming into generation 0's log after the cut (a raw
producer with the old transactional id: records above base_w, records with ts <= base_w
at offsets at or above base_offsets, which break watermark safety, and a record that does
not even decode); the applier killed at random points around the switch (seeds), the
local checkpoint lost at a restart; the site named primary; a second applier on the
same directory; a site too far behind or already past the cut. Every run must end with
the images equal to the oracle: generation 0's writes with ts <= base_w, then
generation 1's up to its W.

Rule tested for the tail (pipeline/backup/generations.py): a record of generation g at
or above base_offsets is never applied, whatever its ts; one with ts <= base_w there broke
watermark safety, and the new primary (rolled forward from the same bounded backlog) does
not hold it either, so it is dropped and counted, and never halts the site.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from pipeline.app.cli import main
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.checkpointer import decode_checkpoint, topic_checkpoint
from pipeline.errors import ApplyError, SiteBusyError
from pipeline.fsutil import atomic_write
from pipeline.ops.status import cg_status, render
from pipeline.site import SiteDir
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import Checkpoint
from tests.backup.follow_helpers import VIDS, GenLog, World, build_world, site_images
from tests.replication_helpers import ServiceThread, wait_until

pytestmark = pytest.mark.kafka

SEEDS = int(os.environ.get("LOWMARK_FOLLOW_SEEDS", "4"))


def _applier(conf: dict[str, Any], cg: str, site: str, site_dir: Path, **opts: Any) -> Applier:
    opts.setdefault("checkpoint_interval_s", 0.05)
    opts.setdefault("compute_digests", False)
    return Applier(ApplierConfig(cg=cg, site=site, data_dir=site_dir, **opts), conf)


def _check_done(world: World, site: str, site_dir: Path) -> None:
    assert site_images(site_dir, VIDS) == world.expected()
    local = decode_checkpoint(SiteDir(site_dir).checkpoint_path.read_bytes())
    assert (local.generation, local.w) == (1, world.w1)
    kafka = topic_checkpoint(world.gen0.conf, world.cg, site, 1)
    assert kafka is not None and kafka.generation == 1


@pytest.mark.parametrize("learn", ["poll", "halt", "lagging"])
def test_live_switch_with_the_old_primarys_tail(
    kafka_conf: dict[str, str], unique_name: str, tmp_path: Path, learn: str
) -> None:
    """``poll``: the applier learns the cut from its roles poll (usually before the tail
    arrives). ``halt``: it never polls on its own, so it reads the tail first; the record
    with ts <= base_w past base_offsets breaks the W it applied, the planner halts, and the
    applier must then read the roles, learn the cut, drop what it read past it and go on.
    ``lagging``: as ``halt``, but the first reads at the halt do not see the new roles yet
    (Kafka writes a transaction's markers after EndTxn returns, so a roles record just
    committed can lie above the last stable offset for a moment): the applier must read
    again rather than halt for good (seen in CI under load)."""
    cg, site_dir = unique_name, tmp_path / "dr1"
    # generation 0's topics exist before the applier starts (as a primary makes them)
    GenLog(kafka_conf, cg, 0).close()
    a = _applier(kafka_conf, cg, "dr1", site_dir)
    th = ServiceThread(a, "applier").start()
    if learn in ("halt", "lagging"):
        a.roles.interval_s = 3600.0
    if learn == "lagging":
        read, hidden = a.roles.read, [3]

        def lagging() -> Any:
            got = read()
            if got is not None and got.generation == 1 and hidden[0] > 0:
                hidden[0] -= 1
                return None  # committed, but not below the last stable offset yet
            return got

        a.roles.read = lagging

    def applier_up(phase: str, w: int) -> None:
        if phase == "w0" or (phase == "cut" and learn != "poll"):
            wait_until(lambda: a.applied_w >= w, 60, f"generation 0 applied to {w}")
        if phase == "roles" and learn != "poll":
            # it can only learn the cut from the halt on the tail: it read past the cut
            wait_until(lambda: (th.check(), a.generation == 1)[1], 60, "the switch")
        th.check()

    try:
        world = build_world(kafka_conf, cg, 7, applier_up)
        wait_until(
            lambda: (th.check(), a.generation == 1 and a.applied_w >= world.w1)[1],
            90,
            "the switch to generation 1 and its W",
        )
        m = a.metrics()
        assert (m["generation"], m["generation_switches"]) == (1, 1)
    finally:
        th.stop()
    _check_done(world, "dr1", site_dir)

    # status: the roles, the history, and the site in generation 1
    st = cg_status(kafka_conf, cg)
    assert (st["generation"], st["primary_site"], st["base_w"]) == (1, "dr-new", world.base_w)
    assert st["sites"]["dr1"]["generation"] == 1 and st["sites"]["dr1"]["lag_records"] == 0
    assert "roles    generation 1, primary dr-new, since W" in render(st)
    bs = ["--cg", cg, "--bootstrap-servers", kafka_conf["bootstrap.servers"]]
    res = CliRunner().invoke(main, ["status", *bs])
    assert res.exit_code == 0, res.output
    assert "generation 1: FAILOVER main -> dr-new at W" in res.output and "forced" in res.output
    res = CliRunner().invoke(main, ["status", *bs, "--json"])
    doc = orjson.loads(res.output)
    assert doc["roles"]["history"][0]["to_site"] == "dr-new" and doc["generation"] == 1


class Crash(BaseException):
    """A simulated kill -9 (not an Exception: nothing in the applier may catch it)."""


def _arm(a: Applier, rng: random.Random, state: dict[str, Any]) -> None:
    """Crash at a random point: the n-th op applied, the n-th checkpoint (before or after
    its local file is written), or while opening generation 1 at the switch."""
    where = rng.choice(["apply", "persist", "persist-local", "open"])
    n = rng.randint(1, {"apply": 120, "persist": 4, "persist-local": 4, "open": 1}[where])
    state.update(where=where, n=n)

    def tick(kind: str) -> None:
        if kind == where:
            state["n"] -= 1
            if state["n"] <= 0:
                state["crashed"] = True
                raise Crash(where)

    apply_op, open_gen = a._apply, a._open_generation

    def _apply(op: Any) -> None:
        tick("apply")
        apply_op(op)

    def _open(generation: int, offsets: dict[int, int]) -> None:
        if generation == 1:
            tick("open")
        open_gen(generation, offsets)

    a._apply = _apply  # type: ignore[method-assign]
    a._open_generation = _open  # type: ignore[method-assign]
    state["arm_persist"] = lambda: _arm_persist(a, tick, where)


def _arm_persist(a: Applier, tick: Any, where: str) -> None:
    persist = a.checkpointer.persist

    def _persist(rec: Any) -> bytes:
        if where == "persist-local":
            try:
                tick("persist-local")
            except Crash:
                atomic_write(a.checkpoint_path, codec.encode(rec))  # the file, not Kafka
                raise
        tick("persist")
        return persist(rec)

    a.checkpointer.persist = _persist  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def world_cache() -> dict[str, World]:
    return {}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_kills_around_the_switch_converge(
    kafka_conf: dict[str, str], tmp_path: Path, seed: int, world_cache: dict[str, World]
) -> None:
    key = kafka_conf["bootstrap.servers"]
    if key not in world_cache:  # one failed-over CG; each seed is another site of it
        world_cache[key] = build_world(kafka_conf, f"follow-kills-{time.time_ns()}", 11)
    world = world_cache[key]
    site, site_dir = f"dr-seed{seed}", tmp_path / "site"
    rng = random.Random(seed)
    crashes: list[str] = []
    switched: list[int] = []
    for attempt in range(8):
        a = _applier(kafka_conf, world.cg, site, site_dir)
        state: dict[str, Any] = {}
        if attempt < 6:
            _arm(a, rng, state)
        try:
            a.start()
            if "arm_persist" in state:
                state["arm_persist"]()
            deadline = time.monotonic() + 60
            while not (a.generation == 1 and a.applied_w >= world.w1):
                assert time.monotonic() < deadline, f"no convergence (seed {seed})"
                a.step()
                if state.get("crashed"):  # a crash in the background checkpoint thread
                    raise Crash("background")
            switches = a.metrics()["generation_switches"]
            a.close()  # its final checkpoint may crash too
        except Crash as c:
            crashes.append(str(c))
            a.close(checkpoint=False)  # the process is gone: no final checkpoint
            if rng.random() < 0.25:  # ... and sometimes the local checkpoint with it
                SiteDir(site_dir).checkpoint_path.unlink(missing_ok=True)
            continue
        switched.append(switches)
        break
    else:
        pytest.fail(f"seed {seed}: never converged; crashes {crashes}")
    _check_done(world, site, site_dir)
    assert crashes, "every seed crashes at least once"


def test_the_primary_site_stops_cleanly_and_a_second_applier_is_refused(
    kafka_conf: dict[str, str], unique_name: str, tmp_path: Path
) -> None:
    cg = unique_name
    GenLog(kafka_conf, cg, 0).close()
    a = _applier(kafka_conf, cg, "dr1", tmp_path / "dr1")
    a.start()
    try:
        b = _applier(kafka_conf, cg, "dr1", tmp_path / "dr1")
        with pytest.raises(SiteBusyError, match=f"in use by process {os.getpid()}"):
            b.start()
        b.close(checkpoint=False)
    finally:
        a.close()
    store = RolesStore(kafka_conf)
    g0 = store.commit(cg, None, initial_roles(cg, "main", now_us=1))
    store.commit(cg, 0, plan_failover(g0, cg, "dr1", 0, {}, True, 2))

    # the real command: a clean exit (0) with the message, no crash loop
    bs = ["--cg", cg, "--bootstrap-servers", kafka_conf["bootstrap.servers"]]
    res = CliRunner().invoke(
        main, ["apply", *bs, "--site", "dr1", "--data-dir", str(tmp_path / "dr1")]
    )
    assert res.exit_code == 0, res.output
    a = _applier(kafka_conf, cg, "dr1", tmp_path / "dr1")
    a.start()
    assert a.finished is not None and "is the primary of generation 1" in a.finished
    stop = threading.Event()
    a.run(stop)  # returns at once
    a.close()


def test_refusals_too_far_behind_and_past_the_cut(
    kafka_conf: dict[str, str], unique_name: str, tmp_path: Path
) -> None:
    cg = unique_name
    rng = random.Random(3)
    store = RolesStore(kafka_conf)
    g0 = store.commit(cg, None, initial_roles(cg, "main", now_us=1))
    gen0 = GenLog(kafka_conf, cg, 0)
    gen0.create("v1", 1)
    gen0.create("v2", 2)
    t = gen0.random_writes(rng, 10, 10)
    w = gen0.publish_w(t)
    a = _applier(kafka_conf, cg, "dr1", tmp_path / "dr1")
    th = ServiceThread(a, "applier").start()
    try:
        wait_until(lambda: a.applied_w >= t, 60, "generation 0 applied")
        # a failover to a cut below what this site applied already: it must not go on
        store.commit(cg, 0, plan_failover(g0, cg, "dr2", t - 5, dict(w.log_offsets), True, 2))
        wait_until(lambda: th.error is not None, 30, "the refusal")
    finally:
        th.stop(check=False)
    assert isinstance(th.error, ApplyError) and "above W" in str(th.error)
    assert "Rebuild this site" in str(th.error)
    a = _applier(kafka_conf, cg, "dr1", tmp_path / "dr1")
    with pytest.raises(ApplyError, match="above W"):
        a.start()  # and a restart says the same
    a.close(checkpoint=False)

    # a site that checkpointed below the cut, but restarts after a W above it was published:
    # before it stopped it may have applied that W, its images cannot tell
    gen0.publish_w(t + 50)
    SiteDir(tmp_path / "dr2b").create()
    atomic_write(  # it checkpointed at the start of the log
        SiteDir(tmp_path / "dr2b").checkpoint_path,
        codec.encode(Checkpoint("dr2b", cg, 0, {}, (), 1)),
    )
    b = _applier(kafka_conf, cg, "dr2b", tmp_path / "dr2b")
    b.start()
    with pytest.raises(ApplyError, match="may have applied generation 0 up to W"):
        for _ in range(2000):
            b.step()
    b.close(checkpoint=False)
    # a fresh site (no checkpoint, no volume) has applied nothing: it cuts and switches
    c = _applier(kafka_conf, cg, "dr2c", tmp_path / "dr2c")
    c.start()
    wait_until(lambda: (c.step(), c.generation == 1)[1], 60, "the fresh site's switch")
    assert c.applied_w == t - 5
    c.close()

    # a new site when the CG is two generations on: only the last cut's offsets are known
    g1 = store.latest(cg)
    store.commit(cg, 1, plan_failover(g1, cg, "main", t, {}, True, 3))
    fresh = _applier(kafka_conf, cg, "dr3", tmp_path / "dr3")
    with pytest.raises(ApplyError, match="2 generations behind"):
        fresh.start()
    fresh.close(checkpoint=False)
