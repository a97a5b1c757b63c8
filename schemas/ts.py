"""A ts: one signed 64-bit integer ``physical_us << 12 | logical``; integer order is causal order.

The encoding every record carries (Avro ``long``), so it lives with the records: composing
and splitting a ts, rendering it exactly (``format_ts``) and reading it back (``parse_ts``).
The clock that issues them is ``pipeline.primary.clock.HybridClock``. The 63-bit ts leaves 51
bits of physical µs: the encoding runs out in year 2041.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

LOGICAL_BITS = 12
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
MAX_TS = 2**63 - 1
MAX_PHYSICAL_US = MAX_TS >> LOGICAL_BITS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def make_ts(physical_us: int, logical: int = 0) -> int:
    """Compose a ts. Raises ValueError when either part is out of range."""
    if not 0 <= physical_us <= MAX_PHYSICAL_US:
        raise ValueError(f"physical_us {physical_us} outside [0, {MAX_PHYSICAL_US}]")
    if not 0 <= logical <= LOGICAL_MASK:
        raise ValueError(f"logical {logical} outside [0, {LOGICAL_MASK}]")
    return physical_us << LOGICAL_BITS | logical


def ts_physical_us(ts: int) -> int:
    """Microseconds since the Unix epoch of ``ts``."""
    return ts >> LOGICAL_BITS


def ts_logical(ts: int) -> int:
    """The logical counter of ``ts``."""
    return ts & LOGICAL_MASK


def format_ts(ts: int) -> str:
    """Render ``ts`` exactly, e.g. ``2026-05-09T07:35:25.123456Z+3``; ``parse_ts`` reverses it."""
    when = _EPOCH + timedelta(microseconds=ts_physical_us(ts))
    return f"{when:%Y-%m-%dT%H:%M:%S.%f}Z+{ts_logical(ts)}"


def parse_ts(text: str | int) -> int:
    """Read a ts: an integer (``123``), or an ISO-8601 time with an optional ``+logical``.

    Accepts ``format_ts`` output, ``2026-05-09T07:35:25Z``, ``2026-05-09T09:35:25+02:00``;
    a time without a zone is taken as UTC. Raises ValueError with the reason.
    """
    if isinstance(text, int):
        return _checked(text, text)
    raw = text.strip()
    if raw.lstrip("+-").isdigit():
        return _checked(int(raw), text)
    logical = 0
    zulu, plus, tail = raw.partition("Z+")
    if plus:
        if not tail.isdigit():
            raise ValueError(f"cannot read ts {text!r}: logical part {tail!r} is not a number")
        raw, logical = zulu + "Z", int(tail)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"cannot read ts {text!r}: give an integer ts or an ISO-8601 time "
            "such as 2026-05-09T07:35:25.123456Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    physical = (when - _EPOCH) // _ONE_US
    try:
        return make_ts(physical, logical)
    except ValueError as exc:
        raise ValueError(f"cannot read ts {text!r}: {exc}") from None


def _checked(ts: int, text: object) -> int:
    if not 0 <= ts <= MAX_TS:
        raise ValueError(f"ts {text!r} outside [0, 2**63)")
    return ts
