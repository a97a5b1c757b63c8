"""glibc allocator settings for a process that receives bulk data over sockets.

asyncio reads a socket into a fresh ``bytes`` of up to 256 KiB per ``recv``. glibc serves
an allocation that large with ``mmap`` (and returns it with ``munmap``) until its *dynamic*
mmap threshold has been raised by an earlier free of such a block, so whether every
``recv`` pays for a new mapping and its page faults depends on the process's allocation
history: the same NBD server code measured 0.45x or 0.85x of ``nbdkit file`` on 64 KiB
writes depending on which modules it had imported (``bench/nbd``), and a joined 1 MiB
payload pays the same way. Fixing the mmap threshold above the largest NBD payload and the
trim threshold above what a connection may hold in flight makes these buffers come from,
and go back to, the heap: every run gets the fast case. Linux/glibc only; elsewhere nothing
happens.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20  # above asyncio's 256 KiB reads and the largest NBD payload
TRIM_THRESHOLD = 256 << 20  # heap kept for reuse instead of returned after every burst

_done = False


def reuse_receive_buffers() -> bool:
    """Set the thresholds once per process; True when glibc took them."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
