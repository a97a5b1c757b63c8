"""A seeded nemesis for a 3-broker cluster behind fault proxies (tests/faults/proxy.py).

Fault kinds (weights in ``KINDS``): ``kill`` (kill -9, down 0.5-3 s, restart), ``pause``
(SIGSTOP 1-10 s, SIGCONT), ``restart`` (SIGTERM, a clean shutdown, then start), and through
the proxy ``partition`` (refuse or blackhole 1-5 s), ``delay`` (0.1-1.5 s for 2-6 s) and
``reset`` (every client connection of one broker reset). Each fault targets the leader of
one of the log topics' partitions with probability ``LEADER_BIAS`` (the Kafka
replication tests' "chasing the leader"), else a node drawn at random.

Faults run one at a time and each is healed before the next: with RF 3 and
min.insync.replicas 2 at most one broker is ever down or cut off, so the other two can
always elect a leader and take acks=all writes; before a fault that takes a broker down,
the nemesis waits until every replica of the watched topic is back in sync.

Replay: the schedule (kinds, durations, target draws, gaps) is a pure function of the
seed (``plan``); ``LOWMARK_NEMESIS_SEED`` picks it, and every action is logged with the
seed, its index and its time. Which node is the leader when a fault fires follows the run.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from connectors.embedded_kafka.cluster import KafkaCluster
from tests.faults.proxy import ProxySet
from tests.kafka_helpers import admin

log = logging.getLogger("lowmark.tests.nemesis")

#: kind -> weight; broker-process faults and network faults about half and half
KINDS = {"kill": 2, "pause": 2, "restart": 1, "partition": 3, "delay": 1, "reset": 2}
LEADER_BIAS = 0.75
BROKER_DOWN = frozenset({"kill", "pause", "restart"})


def seed_from_env(default: int | None = None) -> int:
    raw = os.environ.get("LOWMARK_NEMESIS_SEED", "").strip()
    if raw:
        return int(raw)
    return default if default is not None else random.SystemRandom().randrange(1 << 31)


@dataclass(frozen=True)
class Fault:
    index: int
    kind: str
    #: leader: chase the leader of log partition ``draw % partitions``; else node
    #: ``draw % nodes + 1``
    leader: bool
    draw: int
    seconds: float  # how long the fault lasts (0 for reset)
    param: float | str = 0.0  # delay: seconds per chunk; partition: refuse | blackhole
    gap_s: float = 0.5  # quiet time after the fault healed and the cluster settled


def plan(seed: int, count: int) -> list[Fault]:
    """The schedule of ``count`` faults for ``seed``: the same seed, the same faults."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    out = []
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        leader, draw = rng.random() < LEADER_BIAS, rng.randrange(1 << 16)
        param: float | str = 0.0
        if kind == "kill":
            seconds = rng.uniform(0.5, 3.0)
        elif kind == "pause":
            seconds = rng.uniform(1.0, 10.0)
        elif kind == "restart":
            seconds = rng.uniform(0.2, 1.0)
        elif kind == "partition":
            seconds, param = rng.uniform(1.0, 5.0), rng.choice(["refuse", "blackhole"])
        elif kind == "delay":
            seconds, param = rng.uniform(2.0, 6.0), round(rng.uniform(0.1, 1.5), 3)
        else:
            seconds = 0.0
        out.append(Fault(i, kind, leader, draw, round(seconds, 3), param,
                         round(rng.uniform(0.2, 0.6), 3)))  # fmt: skip
    return out


@dataclass
class Event:
    """What one fault did: its plan, its target and when it started and healed."""

    fault: Fault
    node: int
    started: float  # time.monotonic()
    healed: float = 0.0
    settled: float = 0.0
    note: str = ""

    def as_dict(self, t0: float) -> dict[str, Any]:
        f = self.fault
        return {"i": f.index, "kind": f.kind, "node": self.node, "leader": f.leader,
                "seconds": f.seconds, "param": f.param,
                "t": round(self.started - t0, 3), "healed_t": round(self.healed - t0, 3),
                "settled_t": round(self.settled - t0, 3), "note": self.note}  # fmt: skip


@dataclass
class Nemesis:
    """Runs ``plan(seed, count)`` against ``cluster`` and ``proxies`` on a thread."""

    cluster: KafkaCluster
    proxies: ProxySet
    topics: list[str]  # the log topics whose partition leaders it chases
    seed: int
    count: int
    log_path: Path
    #: called after each fault healed, before the gap (e.g. wait for RPO to recover)
    settle: Callable[[Event], None] | None = None
    events: list[Event] = field(default_factory=list)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.faults = plan(self.seed, self.count)
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._admin = admin(self.cluster.bootstrap_servers)  # direct, not through a proxy

    def start(self) -> Nemesis:
        self.t0 = time.monotonic()
        self._note({"nemesis": "start", "seed": self.seed, "count": self.count,
                    "replay": f"LOWMARK_NEMESIS_SEED={self.seed}"})  # fmt: skip
        self.thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"the nemesis (seed {self.seed}) did not finish in {timeout_s} s")
        if self.error is not None:
            raise AssertionError(f"the nemesis (seed {self.seed}) failed: {self.error!r}")

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(120)

    # ---- the loop

    def _run(self) -> None:
        try:
            for fault in self.faults:
                if self.stop.is_set():
                    break
                if fault.kind in BROKER_DOWN:
                    self._wait_in_sync(60)
                event = Event(fault, self._target(fault), time.monotonic())
                self.events.append(event)
                self._inject(event)
                event.healed = time.monotonic()
                if self.settle is not None:
                    self.settle(event)
                event.settled = time.monotonic()
                self._note({"seed": self.seed, **event.as_dict(self.t0)})
                self.stop.wait(fault.gap_s)
        except BaseException as exc:  # the test reads it in join()
            self.error = exc
            self._note({"seed": self.seed, "nemesis": "failed", "error": repr(exc)})
        finally:
            self.proxies.heal()
            for node, pid in self.cluster.node_pids.items():
                if pid is not None:
                    os.kill(pid, signal.SIGCONT)  # never leave a broker stopped
                else:
                    self.cluster.start_node(node)

    def _target(self, fault: Fault) -> int:
        nodes = self.cluster.node_ids
        if fault.leader:
            parts = self._partitions()
            if parts:
                leader = parts[fault.draw % len(parts)][0]
                if leader in nodes:
                    return leader
        return nodes[fault.draw % len(nodes)]

    def _inject(self, event: Event) -> None:
        f, node = event.fault, event.node
        if f.kind == "kill":
            self.cluster.kill_node(node)
            self.stop.wait(f.seconds)
            self.cluster.start_node(node, timeout_s=90)
        elif f.kind == "pause":
            pid = self._pid(node)
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(f.seconds)  # not stop.wait: a pause always lasts its time
            finally:
                os.kill(pid, signal.SIGCONT)
        elif f.kind == "restart":
            self._clean_stop(node)
            time.sleep(f.seconds)
            self.cluster.start_node(node, timeout_s=90)
        elif f.kind == "partition":
            self.proxies.partition(node, str(f.param))
            time.sleep(f.seconds)
            self.proxies.heal(node)
        elif f.kind == "delay":
            self.proxies.delay(node, float(f.param))
            time.sleep(f.seconds)
            self.proxies.heal(node)
        else:
            event.note = f"{self.proxies.reset(node)} connections reset"

    def _clean_stop(self, node: int) -> None:
        pid = self._pid(node)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.cluster.node_pids.get(node) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.cluster.kill_node(node)  # reaps it, or kills one that ignored SIGTERM

    def _pid(self, node: int) -> int:
        pid = self.cluster.node_pids.get(node)
        if pid is None:
            raise AssertionError(f"kafka node {node} is not running before a fault")
        return pid

    # ---- cluster state, read directly from the brokers

    def _partitions(self) -> list[tuple[int, int, int]]:
        """(leader, in-sync replicas, replicas) of each partition of the watched topics."""
        out = []
        try:
            topics = self._admin.list_topics(timeout=5).topics
        except Exception:  # metadata unavailable for a moment: target at random
            return []
        for name in self.topics:
            md = topics.get(name)
            if md is None or md.error is not None:
                return []
            out += [(p.leader, len(p.isrs), len(p.replicas)) for p in md.partitions.values()]
        return out

    def _wait_in_sync(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            parts = self._partitions()
            if parts and all(p[0] >= 0 and p[1] == p[2] for p in parts):
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.topics}: replicas not back in sync within {timeout_s} s")

    def _note(self, entry: dict[str, Any]) -> None:
        entry = {"at": time.strftime("%FT%TZ", time.gmtime()), **entry}
        log.info("nemesis %s", entry)
        with open(self.log_path, "ab") as fh:
            fh.write(orjson.dumps(entry) + b"\n")

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.fault.kind] = out.get(e.fault.kind, 0) + 1
        return out
