"""Dead-letter copies: the raw bytes of a record lowmark refused, with where it came from.

One shape for every service that refuses records (the applier's log records, the
watermark service's progress records), so one tool reads them all: the headers are plain
text, readable with ``kcat -C -t lowmark.<cg>.deadletter -f '%h %s\\n'``.
"""

from __future__ import annotations

from pipeline.errors import LowmarkError


def deadletter_headers(
    source_topic: str, partition: int, offset: int, exc: LowmarkError, reporter: str
) -> list[tuple[str, bytes]]:
    """Headers of the dead-letter copy of the record at (source_topic, partition, offset)."""
    return [
        ("source.topic", source_topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
        ("error", str(exc).encode()[:1000]),
        ("error.class", type(exc).__name__.encode()),
        ("site", reporter.encode()),
    ]
