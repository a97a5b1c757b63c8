"""The NBD reader of bench.failover: python3-libnbd, a client lowmark did not write.

libnbd's Python binding is a Debian package (python3-libnbd) for the system Python, not in
the project's venv, so bench.failover runs this module in a child of ``/usr/bin/python3``::

    /usr/bin/python3 -c 'import sys; from bench.failover_reader import main; sys.exit(main())' \
        SPOTS.json                                  # cwd: the repository root

It imports only the standard library and ``nbd``, and it has no ``__main__`` block (``make
bench`` runs the modules that have one with the venv's Python, which has no ``nbd``).

The parent drives it with one JSON command per line on stdin; it answers with one JSON
line per event on stdout. Every time is ``time.monotonic()`` (CLOCK_MONOTONIC, the same
clock in every process of the machine), so the parent subtracts its own spawn time:

- ``{"ev": "ready", "mono": t}`` once ``nbd`` is imported (start-up is not measured).
- ``{"cmd": "connect", "uris": {vol: uri}, "socket": path, "first": [vol, offset]}``:
  answers ``{"ev": "waiting", "mono": t}``, then polls every ``poll_s`` until ``socket``
  exists and ``connect_uri`` succeeds (each failed try gets a fresh handle), reads 4 KiB at
  ``first`` (if given) and answers ``{"ev": "connected", "connected_mono", "first_read":
  {"start_mono", "end_mono", "crc"}, "attempts"}``, after connecting every other volume.
- ``{"cmd": "reads", "mode": "once" | "until_stop", "rate": reads/s}``: 4 KiB reads of
  the spots (``SPOTS.json``: ``{"length": 4096, "spots": [[vol, offset], ...]}``), one at a
  time (queue depth 1), paced to ``rate`` (0: back to back); ``once`` reads each spot once
  in file order, ``until_stop`` cycles through them until a ``stop`` line arrives. Answers
  ``{"ev": "reads", "samples": [[spot, start_mono, latency_ns, crc32 or -1], ...],
  "errors": [...]}``.
- ``{"cmd": "close"}`` closes the handles; ``{"cmd": "quit"}`` ends the process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import sys
import time
import zlib
from typing import Any


class _Stdin:
    """Lines from fd 0 without Python's buffering, so ``select`` tells the truth."""

    def __init__(self) -> None:
        self._buf = b""

    def _fill(self, timeout_s: float | None) -> bool:
        ready, _, _ = select.select([0], [], [], timeout_s)
        if not ready:
            return False
        chunk = os.read(0, 65536)
        if not chunk:
            raise EOFError("the parent closed stdin")
        self._buf += chunk
        return True

    def line(self, timeout_s: float | None = None) -> str | None:
        """The next line; None if none arrives within ``timeout_s`` (None: wait)."""
        while b"\n" not in self._buf:
            if not self._fill(timeout_s):
                return None
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Reader:
    def __init__(self, nbd: Any, spots: list[tuple[str, int]], length: int) -> None:
        self.nbd = nbd
        self.spots = spots
        self.length = length
        self.handles: dict[str, Any] = {}
        self.stdin = _Stdin()

    def _connect_one(self, uri: str) -> Any:
        h = self.nbd.NBD()
        h.connect_uri(uri)  # on failure h is dropped: libnbd closes a handle when freed
        return h

    def connect(self, cmd: dict[str, Any]) -> None:
        uris: dict[str, str] = cmd["uris"]
        sock: str = cmd["socket"]
        poll_s = float(cmd.get("poll_s", 0.002))
        deadline = time.monotonic() + float(cmd.get("timeout_s", 600))
        first = cmd.get("first")
        first_vol = first[0] if first else next(iter(uris))
        _say(ev="waiting", mono=time.monotonic())
        attempts = 0
        while True:
            attempts += 1
            if os.path.exists(sock):
                try:
                    h = self._connect_one(uris[first_vol])
                    break
                except self.nbd.Error as exc:
                    last = str(exc)
            else:
                last = f"no socket {sock} yet"
            if time.monotonic() > deadline:
                _say(ev="error", error=f"no NBD server answered: {last}", attempts=attempts)
                return
            time.sleep(poll_s)
        connected = time.monotonic()
        self.handles[first_vol] = h
        out: dict[str, Any] = {"ev": "connected", "connected_mono": connected,
                               "attempts": attempts}
        if first:
            t0 = time.monotonic()
            data = h.pread(self.length, int(first[1]))
            t1 = time.monotonic()
            out["first_read"] = {"start_mono": t0, "end_mono": t1, "crc": zlib.crc32(data),
                                 "volume": first_vol, "offset": int(first[1])}
        for vol, uri in uris.items():
            if vol not in self.handles:
                self.handles[vol] = self._connect_one(uri)
        out["all_connected_mono"] = time.monotonic()
        _say(**out)

    def reads(self, cmd: dict[str, Any]) -> None:
        until_stop = cmd.get("mode") == "until_stop"
        rate = float(cmd.get("rate", 0))
        interval = 1.0 / rate if rate > 0 else 0.0
        samples: list[list[int | float]] = []
        errors: list[str] = []
        clock = time.perf_counter_ns
        next_at = time.monotonic()
        i = 0
        n = len(self.spots)
        while until_stop or i < n:
            if until_stop and self.stdin.line(0) is not None:
                break  # "stop"
            if interval:
                now = time.monotonic()
                if next_at > now:
                    time.sleep(next_at - now)
                next_at = max(next_at + interval, time.monotonic() - interval)
            k = i % n
            vol, off = self.spots[k]
            start = time.monotonic()
            t = clock()
            try:
                data = self.handles[vol].pread(self.length, off)
                crc = zlib.crc32(data)
            except self.nbd.Error as exc:
                crc = -1
                if len(errors) < 20:
                    errors.append(f"{vol}@{off}: {exc}")
            samples.append([k, start, clock() - t, crc])
            i += 1
        _say(ev="reads", samples=samples, errors=errors)

    def close(self) -> None:
        for h in self.handles.values():
            with contextlib.suppress(self.nbd.Error):
                h.shutdown()
        self.handles = {}  # freed handles are closed
        _say(ev="closed")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        doc = json.load(f)
    nbd = importlib.import_module("nbd")  # python3-libnbd; Any to the type checker
    reader = Reader(nbd, [(str(v), int(o)) for v, o in doc["spots"]], int(doc["length"]))
    _say(ev="ready", mono=time.monotonic(), libnbd=nbd.NBD().get_version())
    while True:
        try:
            line = reader.stdin.line()
        except EOFError:
            return 0
        if not line or not line.strip():
            continue
        cmd = json.loads(line)
        what = cmd.get("cmd")
        if what == "connect":
            reader.connect(cmd)
        elif what == "reads":
            reader.reads(cmd)
        elif what == "close":
            reader.close()
        elif what == "quit":
            return 0
        else:
            _say(ev="error", error=f"unknown command {what!r}")
