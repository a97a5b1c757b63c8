"""Test oracles written apart from the product: what a reader of an image sees, and digests
of it, computed here with nothing but ``hashlib`` and plain reads.

Every backup-vs-primary comparison in the tests goes through these, never through
``connectors.image.image.content_digest*``: a bug in the product's digest would otherwise
hide itself by hashing both sides the same wrong way. The product digest has its own
tests against these oracles (``tests/connectors/image/test_image_digest.py``).

- ``read_image`` / ``reader_bytes``: the bytes a reader of a volume sees (a sparse tail
  past EOF reads as zeroes, as ``pread`` on the image does);
- ``reader_digest``: SHA-256 over the size and those bytes, for maps of many volumes;
- ``first_difference``: where two images first differ, for failure messages;
- ``claimed_digest``: what the product's digest *should* be for given bytes, from the
  format it documents (BLAKE2b-160 over a tag, the size, and each non-zero 64 KiB block
  with its byte offset). Only for checking digests the product *claims* (checkpoints,
  restore manifests) when the images they describe no longer exist; written as the
  plainest possible loop over the bytes, with no extents and no holes involved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def read_image(path: Path | str, size: int | None = None) -> bytes:
    """The bytes a reader of the image file sees, ``size`` long when given (zero-padded
    past EOF: a sparse tail). A missing file raises ``FileNotFoundError``."""
    data = Path(path).read_bytes()
    if size is None:
        return data
    if len(data) > size:
        raise AssertionError(f"image {path} holds {len(data)} bytes, more than its size {size}")
    return data + bytes(size - len(data))


def reader_bytes(path: Path | str, size: int | None = None) -> bytes | None:
    """``read_image``, or None when the file does not exist."""
    try:
        return read_image(path, size)
    except FileNotFoundError:
        return None


def reader_digest(data: bytes | bytearray) -> str:
    """SHA-256 over (size, bytes): equal exactly when a reader sees the same image."""
    h = hashlib.sha256()
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
    return "sha256:" + h.hexdigest()


def file_reader_digest(path: Path | str, size: int | None = None) -> str:
    return reader_digest(read_image(path, size))


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    """'' when equal, else where and how two images first differ."""
    if a == b:
        return ""
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    at = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first difference at byte {at} ({a[at]:#04x} != {b[at]:#04x})"


CLAIMED_BLOCK = 64 << 10


def claimed_digest(data: bytes | bytearray) -> str:
    """The digest the product documents for an image reading as ``data``.

    Deliberately naive: walk every 64 KiB block of the bytes (the last one may be
    short) and hash the ones holding a non-zero byte, with their byte offset.
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(b"lowmark-image-v1")
    h.update(len(data).to_bytes(8, "little"))
    for offset in range(0, len(data), CLAIMED_BLOCK):
        block = bytes(data[offset : offset + CLAIMED_BLOCK])
        if block.count(0) != len(block):
            h.update(offset.to_bytes(8, "little"))
            h.update(block)
    return h.hexdigest()
