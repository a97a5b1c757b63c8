"""A primary interceptor in a process of its own, driven line by line over stdin/stdout.

``tests/system/test_disasters.py`` runs two of these and kills them with SIGKILL mid-workload, so
what they acknowledged but had not yet committed to Kafka is lost exactly as on a crashed
host (the test process keeps the backup side alive).

    python -m tests.disaster_driver        (cwd: the repository root)

Protocol, one ASCII line each way:

- first stdin line: JSON ``{"kafka": {librdkafka settings}, "cg", "dir", "interceptor_id",
  "volume", "size", "mode", "engine": {InterceptorConfig options}}``; the settings come
  on stdin rather than argv so SASL passwords never show in ``ps``;
- answer ``READY <epoch>`` once the CG is joined and the volume is created (durable);
- ``W <offset> <length> <seed> <index>`` writes ``payload(seed, index, length)`` and answers
  ``A <ts>`` after ``Volume.write`` returned (async: local write done; sync: durable);
- ``F`` flushes, answers ``F``; ``Q`` closes gracefully (LEAVE), answers ``Q`` and exits;
- a command that raises answers ``E <ErrorClass> <message>``;
- EOF on stdin (the test process died): exit at once, publishing nothing more.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

PAYLOAD_MIN = 128


def payload(seed: int, index: int, length: int) -> bytes:
    """The bytes of write ``index`` of disaster ``seed``: a readable header, then noise.

    Distinct for every (seed, index), so a block that holds another write's bytes, a stale
    copy or a torn mix of two writes never matches.
    """
    if length < PAYLOAD_MIN:
        raise ValueError(f"payload length {length} is below {PAYLOAD_MIN}")
    header = f"lowmark-disaster seed={seed} write={index} len={length}\n".encode()
    body = random.Random(seed * 1_000_003 + index).randbytes(length - len(header))
    return header + body


def _answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _serve(cfg: dict[str, Any]) -> None:
    # imported here so a bad first line fails fast with a readable message
    from pipeline.logs import setup_logging
    from pipeline.primary.volume import ConsistencyGroup

    setup_logging("warning")
    cg = ConsistencyGroup.open(
        cfg["cg"],
        cfg["dir"],
        cfg["kafka"],
        interceptor_id=cfg["interceptor_id"],
        **cfg.get("engine", {}),
    )
    vol = cg.create_volume(cfg["volume"], cfg["size"], mode=cfg["mode"])
    _answer(f"READY {cg.interceptor.epoch}")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        try:
            if cmd[0] == "W":
                offset, length, seed, index = (int(x) for x in cmd[1:5])
                ts = vol.write(offset, payload(seed, index, length))
                _answer(f"A {ts}")
            elif cmd[0] == "F":
                vol.flush()
                _answer("F")
            elif cmd[0] == "Q":
                cg.close()
                _answer("Q")
                return
            else:
                _answer(f"E ValueError unknown command {cmd[0]!r}")
        except Exception as exc:  # the test decides what an error means; keep serving
            message = str(exc).replace("\n", " ")
            _answer(f"E {type(exc).__name__} {message}")
    # stdin closed without Q: the test process is gone; die like a crashed host
    os._exit(3)


def main() -> None:
    first = sys.stdin.readline()
    if not first:
        os._exit(3)
    _serve(json.loads(first))


if __name__ == "__main__":
    main()
