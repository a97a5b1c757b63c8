"""The write gate a marker holds (``pipeline.primary.gate``), and what NBD clients see.

Tries to break: a hold that returns while a write is still inside; a write admitted
while held; a parked NBD write that is never woken, or woken before the release; a hold
whose drain times out but leaves the gate closed; the NBD event loop blocked while writes
are held (a read must still be answered at once); a held NBD write lost or reordered.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from pipeline.errors import ReplicationError
from pipeline.primary.gate import WriteGate
from pipeline.primary.nbd_volume import VolumeExport
from pipeline.primary.volume import ConsistencyGroup
from tests.nbd_helpers import ServerThread
from tests.primary.test_zero_allocation import nbdsh_env
from tests.replication_helpers import FAST


def test_a_hold_waits_for_every_write_inside_and_admits_none_until_released() -> None:
    gate = WriteGate()
    assert gate.try_enter()
    done = threading.Event()
    threading.Thread(target=lambda: (gate.hold(5), done.set()), daemon=True).start()
    time.sleep(0.05)
    assert not done.is_set(), "the hold returned with a write inside"
    assert not gate.try_enter(), "a write was admitted while the gate closes"
    gate.exit()
    assert done.wait(2)
    assert not gate.try_enter()
    woken: list[int] = []
    gate.when_open(lambda: woken.append(1))
    blocked = threading.Thread(target=lambda: (gate.enter(5), woken.append(2)), daemon=True)
    blocked.start()
    time.sleep(0.05)
    assert woken == []
    assert gate.release() > 0
    blocked.join(2)
    assert sorted(woken) == [1, 2]
    gate.exit()
    gate.when_open(lambda: woken.append(3))  # open: at once
    assert woken[-1] == 3


def test_a_drain_that_times_out_opens_the_gate_again() -> None:
    gate = WriteGate()
    assert gate.try_enter()
    assert gate.hold(0.05) is False
    assert not gate.held and gate.try_enter()


def test_a_blocking_writer_gives_up_after_its_timeout() -> None:
    gate = WriteGate()
    assert gate.hold(1)
    with pytest.raises(ReplicationError, match="held for a marker"):
        gate.enter(0.05)


@pytest.mark.parametrize("seed", range(20))
def test_random_writers_and_holds_never_overlap(seed: int) -> None:
    rng = random.Random(seed)
    gate = WriteGate()
    inside = [0]
    violations: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer() -> None:
        r = random.Random(rng.random())
        while not stop.is_set():
            if r.random() < 0.5:
                if not gate.try_enter():
                    continue
            else:
                gate.enter(5)
            with lock:
                inside[0] += 1
                if gate.held and holding[0]:
                    violations.append("a write inside during a hold")
            time.sleep(r.random() * 0.0005)
            with lock:
                inside[0] -= 1
            gate.exit()

    holding = [False]
    threads = [threading.Thread(target=writer, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(30):
        if gate.hold(1):
            holding[0] = True
            with lock:
                if inside[0]:
                    violations.append(f"{inside[0]} writes inside after the drain")
            time.sleep(rng.random() * 0.002)
            holding[0] = False
            gate.release()
        time.sleep(rng.random() * 0.002)
    stop.set()
    for t in threads:
        t.join(5)
    assert violations == []


@pytest.mark.kafka
@pytest.mark.tools
def test_nbd_reads_flow_and_writes_wait_while_a_marker_holds(kafka_conf, unique_name, tmp_path):
    import subprocess

    env = nbdsh_env()
    opts = {**FAST, "markers": False}  # the gate is driven by hand here
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **opts) as cg:
        vol = cg.create_volume("v", 1 << 20)
        vol.write(0, b"r" * 4096)
        with ServerThread({"v": VolumeExport(vol)}) as srv:
            assert cg.gate.hold(1)
            try:
                two = "h.pwrite(b'w' * 4096, 4096); h.pwrite(b'x' * 4096, 4096)"
                writer = subprocess.Popen(["nbdsh", "-u", srv.uri("v"), "-c", two],
                                          env=env, stderr=subprocess.PIPE)  # fmt: skip
                time.sleep(0.5)
                assert writer.poll() is None, "a write was answered while held"
                assert vol.pread(4096, 4096) == bytes(4096), "a held write took effect"
                t0 = time.monotonic()  # the write waits: the server's loop must not
                read = subprocess.run(["nbdsh", "-u", srv.uri("v"), "-c",
                                       "assert h.pread(4096, 0) == b'r' * 4096"],
                                      env=env, capture_output=True, timeout=30)  # fmt: skip
                assert read.returncode == 0, read.stderr
                assert time.monotonic() - t0 < 3, "a read waited for the held writes"
            finally:
                cg.gate.release()
            assert writer.wait(30) == 0, writer.stderr.read() if writer.stderr else ""
            assert vol.pread(4096, 4096) == b"x" * 4096  # both, in order
            assert srv.loop_errors == []
