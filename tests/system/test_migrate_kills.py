"""Migrations back and forth with random kills of the source, the target or the command.

Tries to break the single-writer rule and the migration's atomicity: a checker samples
both interceptors' state of the volume (what their export does with a write) and the
volume's entry in ``lowmark.config`` every few ms through every migration and every
restart, and fails on an instant where both would take writes, or an entry naming two
``optimized``. A killed migration must complete when run again. Writers with a path to
each interceptor (and one that rides through on both) write throughout; at the end the
volume holds every acknowledged write (or a later one whose answer was lost), and the
backup site's image equals it.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
import time

import orjson
import pytest

from pipeline.topology.catalog import read_topology
from tests.kafka_helpers import unique
from tests.replication_helpers import wait_until
from tests.system.migrate_helpers import TwoPrimaries, running
from tests.system.nbd_paths import BS, PathWriter, decode_block
from tests.torture_summary import record

pytestmark = pytest.mark.kafka

VOLUME = "vol1"
KILLS = ("none", "none", "command", "source", "target")
SERVES = {"primary-a": "serve", "primary-b": "serve_b"}


class Checker(threading.Thread):
    """Samples both sides and the topology until stopped; ``violations`` says what it saw."""

    def __init__(self, two: TwoPrimaries, kafka_conf: dict) -> None:
        super().__init__(daemon=True)
        self.two, self.kafka_conf = two, kafka_conf
        self.stop_ = threading.Event()
        self.samples = 0
        self.violations: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop_.is_set():
            states = self.two.states(VOLUME)
            self.samples += 1
            served = [i for i, s in states.items() if s == "served"]
            if len(served) > 1:
                self.violations.append(f"{time.monotonic():.3f}: both serve it: {states}")
            n += 1
            if n % 20 == 0:  # the topology, less often: a read of lowmark.config
                try:
                    topo = read_topology(self.kafka_conf, self.two.cg)
                except Exception:
                    continue
                for v in topo.live().values():
                    opt = [i for i, a in v.access.items() if a == "optimized"]
                    if len(opt) > 1:
                        self.violations.append(f"entry of {v.name} names {opt} optimized")
            time.sleep(0.005)


def other(iid: str) -> str:
    return "primary-b" if iid == "primary-a" else "primary-a"


def chaos(two: TwoPrimaries, kafka_conf: dict, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    writers = [
        PathWriter([a, b], VOLUME, range(0, 256)).start(),  # rides through, multipath
        PathWriter([a], VOLUME, range(1024, 1280), pinned=0).start(),
        PathWriter([b], VOLUME, range(2048, 2304), pinned=0).start(),
    ]
    checker = Checker(two, kafka_conf)
    checker.start()
    out: dict = {"kills": {}, "reruns": 0, "pauses_ms": []}
    where = "primary-a"
    try:
        for i in range(rounds):
            to = other(where)
            kill = rng.choice(KILLS)
            out["kills"][kill] = out["kills"].get(kill, 0) + 1
            src = two.admin[where]
            argv = two.argv("migrate", VOLUME, "--to", to, "--admin-socket", str(src),
                            "--to-admin", str(two.admin[to]), "--lease", "3", "--json")  # fmt: skip
            cmd = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=two.env)  # fmt: skip
            if kill != "none":
                # mid-migration: once the command has begun (the target stages it), then
                # at a random point of the copy, the follow or the cutover
                deadline = time.monotonic() + 10
                while (two.states(VOLUME).get(to) == "absent" and cmd.poll() is None
                       and time.monotonic() < deadline):  # fmt: skip
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.3))
                victim = {"command": None, "source": SERVES[where], "target": SERVES[to]}[kill]
                if victim is None:
                    cmd.kill()
                else:
                    two.procs[victim].kill()
                    two.procs[victim].wait()
            cout, cerr = cmd.communicate(timeout=120)
            assert b"Traceback" not in cerr, cerr.decode(errors="replace")[-3000:]
            print(
                f"round {i} {where}->{to} kill {kill}: rc {cmd.returncode} "
                f"{(cout + cerr).decode(errors='replace')[-300:]!r} states {two.states(VOLUME)}"
            )
            for name in SERVES.values():
                if two.procs[name].poll() is not None:
                    two.start(name)
                    wait_until(lambda n=name: two.numbers(n).get("lowmark_primary_up") == 1.0,
                               60, f"{name} up again")  # fmt: skip
            if kill != "none" or cmd.returncode != 0:
                out["reruns"] += 1
            assert not checker.violations, checker.violations[:10]
            res = two.migrate_ok(VOLUME, to, "--lease", "3")
            assert not checker.violations, checker.violations[:10]
            assert res["outcome"] == "migrated", res
            if res["io_pause_s"] is not None:
                out["pauses_ms"].append(round(res["io_pause_s"] * 1000))
            states = two.states(VOLUME)
            assert states == {to: "served", where: "absent"}, (i, kill, states)
            where = to
        time.sleep(0.5)
    finally:
        for w in writers:
            w.stop()
        checker.stop_.set()
        checker.join(30)
    out["where"] = where
    out["writers"] = writers
    out["checker"] = checker
    return out


@pytest.fixture
def two(kafka, tmp_path):
    vols = (("vol1", "16MiB", "async"),)
    with running(tmp_path, kafka.bootstrap_servers, unique("migkill"), vols) as svc:
        yield svc


@pytest.mark.parametrize(
    ("rounds", "seed"),
    [
        pytest.param(8, 18, id="short"),
        *(
            pytest.param(
                20, seed, id=f"long-{seed}", marks=[pytest.mark.torture, pytest.mark.timeout(1800)]
            )
            for seed in (1801, 1802, 1803)
        ),
    ],
)
def test_migrations_with_random_kills_keep_one_writer_and_every_write(two, kafka_conf, rounds,
                                                                      seed):  # fmt: skip
    t0 = time.monotonic()
    out = chaos(two, kafka_conf, rounds, seed)
    checker: Checker = out["checker"]
    assert not checker.violations, checker.violations[:10]
    assert checker.samples > rounds * 10, checker.samples
    port = two.nbd[out["where"]]
    image = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/{VOLUME}", "-"],
                           capture_output=True, timeout=60, check=True).stdout  # fmt: skip
    checked = 0
    for w in out["writers"]:
        acked, doubt = w.acked(), w.in_doubt()
        assert acked, f"writer on {w.ports} never got a write through"
        for block, seq in acked.items():
            got = decode_block(image[block * BS : (block + 1) * BS])
            assert got is not None and got[0] == block, (block, got)
            assert got[1] == seq or got[1] in doubt.get(block, ()), (block, seq, got)
            checked += 1
    want = hashlib.sha256(image).hexdigest()
    img = two.tmp / "backup" / "images" / f"{VOLUME}.img"
    wait_until(lambda: img.exists() and hashlib.sha256(img.read_bytes()).hexdigest() == want,
               60, "the backup's image equals the volume")  # fmt: skip
    pauses = sorted(out["pauses_ms"])
    summary = {"rounds": rounds, "seed": seed, "kills": out["kills"], "reruns": out["reruns"],
               "samples": checker.samples, "acked_blocks_checked": checked,
               "pause_ms_p50": pauses[len(pauses) // 2] if pauses else None,
               "pause_ms_max": pauses[-1] if pauses else None}  # fmt: skip
    print(orjson.dumps(summary).decode())
    record(
        f"migration kills ({rounds} migrations)",
        faults=sum(v for k, v in out["kills"].items() if k != "none"),
        checked=checked,
        violations=0,
        checked_what="acked blocks at the final interceptor and at the backup; one writer at "
        f"every one of {checker.samples} samples",
        seconds=time.monotonic() - t0,
        seed=seed,
        **{k: v for k, v in summary.items() if k not in ("rounds", "seed")},
    )
