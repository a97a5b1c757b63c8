"""The test helpers other tests trust must not swallow what they are there to show.

Tries to break: a service thread that fails while a test only looks at images (its
error must fail the test at ``stop``), one that does not stop, a log read that hits its
deadline and hands back the records it got so far as if that were the log, and the
independent image oracles themselves (sizes, sparse tails, the first difference).
No broker: the services and the consumer are stand-ins.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import tests.replication_helpers as rh
from schemas import codec
from schemas.records import Marker
from tests.oracles import first_difference, read_image, reader_bytes, reader_digest


class FakeService:
    def __init__(self, fail: BaseException | None = None, ignore_stop: bool = False) -> None:
        self.fail = fail
        self.ignore_stop = ignore_stop
        self.closed = False
        self.release = threading.Event()

    def start(self) -> None:
        pass

    def run(self, stop: threading.Event) -> None:
        if self.fail is not None:
            raise self.fail
        (self.release if self.ignore_stop else stop).wait(30)

    def close(self) -> None:
        self.closed = True


def test_service_thread_stop_raises_the_services_error() -> None:
    service = FakeService(fail=ValueError("the applier halted: bad record at [2]@17"))
    st = rh.ServiceThread(service, "applier").start()
    st.thread.join(10)
    with pytest.raises(AssertionError, match="applier failed: ValueError") as info:
        st.stop()
    assert isinstance(info.value.__cause__, ValueError)
    assert service.closed, "stop closes the service before it raises"
    with pytest.raises(AssertionError):
        st.check()


def test_service_thread_stop_is_quiet_when_the_service_is_fine() -> None:
    service = FakeService()
    st = rh.ServiceThread(service, "wm").start()
    st.stop()
    assert service.closed and st.error is None


def test_service_thread_that_does_not_stop_is_an_error() -> None:
    service = FakeService(ignore_stop=True)
    st = rh.ServiceThread(service, "stuck").start()
    try:
        with pytest.raises(AssertionError, match="did not stop"):
            st.stop(join_timeout_s=0.2)
        assert not service.closed, "closed under a running thread"
    finally:
        service.release.set()
        st.thread.join(10)


def test_stop_all_stops_every_thread_then_raises_the_first_error() -> None:
    bad, good = FakeService(fail=RuntimeError("boom")), FakeService()
    threads = [rh.ServiceThread(bad, "bad").start(), rh.ServiceThread(good, "good").start()]
    threads[0].thread.join(10)
    with pytest.raises(AssertionError, match="bad failed"):
        rh.stop_all(*threads, None)
    assert bad.closed and good.closed and not threads[1].thread.is_alive()


class _Msg:
    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self._p, self._o, self._v = partition, offset, value

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v


class _StallingConsumer:
    """Every partition ends at offset 10; only 3 records of partition 0 ever arrive."""

    def __init__(self, conf: dict[str, Any]) -> None:
        marker = Marker("m", 1 << 12, "x", 0, 1)
        self._pending = [_Msg(0, i, codec.encode(marker)) for i in range(3)]

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, 10

    def assign(self, tps: list[Any]) -> None:
        pass

    def consume(self, n: int, timeout: float) -> list[_Msg]:
        out, self._pending = self._pending, []
        if not out:
            threading.Event().wait(min(timeout, 0.05))
        return out

    def close(self) -> None:
        pass


def test_read_log_fails_at_its_deadline_saying_how_much_it_read(monkeypatch) -> None:
    monkeypatch.setattr(rh, "Consumer", _StallingConsumer)
    with pytest.raises(AssertionError, match=r"only 3 records read, up to offsets \{0: 3"):
        rh.read_log({}, "cg", timeout_s=0.3)
    with pytest.raises(AssertionError, match="partitions \\[0, 1, 2, 3\\] not at their end"):
        rh.read_log_from({}, "cg", {0: 0}, timeout_s=0.3)


def test_image_oracles_read_what_a_reader_sees(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(b"abc")
    assert read_image(path, 6) == b"abc\0\0\0"  # a sparse tail past EOF reads as zeroes
    with pytest.raises(AssertionError, match="more than its size"):
        read_image(path, 2)
    assert reader_bytes(tmp_path / "missing.img", 4) is None
    assert reader_digest(b"\0") != reader_digest(b"\0\0") != reader_digest(b"")
    assert first_difference(b"abc", b"abc") == ""
    assert "byte 1" in first_difference(b"abc", b"axc")
    assert "sizes differ" in first_difference(b"ab", b"abc")
