"""An interceptor drains for a planned switchover: nothing acknowledged is left behind.

``drain(interceptor, request)`` runs once, when the roles watch reads a drain request
for the interceptor's own generation (``pipeline.topology.drain``):

1. new writes are refused (``Interceptor.stamp`` raises ``DrainingError``; an NBD write
   gets an error reply and a client retries at the new primary);
2. every write stamped before that is made durable in Kafka (a barrier), so every async
   write acknowledged so far is in the log below the interceptor's final S;
3. the final progress (LEAVE) is published and the interceptor stops: W then passes its
   final S, and the switchover cuts there (``pipeline.ops.failover``);
4. the interceptor is fenced (``Interceptor.fence``): nothing is acknowledged after, and
   ``lowmark serve`` exits saying where the primary went.

A drain that cannot finish (Kafka away for ``replication_timeout_s``) fails the
interceptor like any replication failure; the switchover then times out and says so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.errors import FencedError, LowmarkError, ReplicationError
from pipeline.logs import event
from schemas.records import DrainRequest

if TYPE_CHECKING:
    from pipeline.primary.interceptor import Interceptor

log = logging.getLogger("lowmark.interceptor")


class DrainingError(ReplicationError):
    """The interceptor is draining for a switchover: it takes no new writes."""


def draining_error(request: DrainRequest, interceptor_id: str) -> DrainingError:
    return DrainingError(
        f"interceptor {interceptor_id} of CG {request.cg} is draining for a switchover to "
        f"site {request.to_site!r}: it takes no new writes. Reconnect to the new primary "
        f"once the switchover is done (`lowmark roles show`)"
    )


def drain(engine: Interceptor, request: DrainRequest) -> None:
    """Steps 1-4 of the module docstring; safe to call more than once."""
    iid = engine.config.interceptor_id
    if engine.draining is not None:
        return
    engine.draining = draining_error(request, iid)
    event(log, "draining for a switchover", cg=request.cg, interceptor=iid,
          generation=request.generation, to_site=request.to_site)  # fmt: skip
    try:
        engine.barrier().wait()
    except LowmarkError as exc:
        event(log, "drain failed: the interceptor's writes are not all durable", logging.ERROR,
              interceptor=iid, error=str(exc))  # fmt: skip
        return
    engine.close()  # publishes the LEAVE with the final S
    engine.fence(
        FencedError(
            f"interceptor {iid} of CG {request.cg} drained for the switchover to site "
            f"{request.to_site!r} (final S {engine.last_s}); every write it acknowledged is "
            "replicated. Use the new primary; this site rejoins as a backup (failback)"
        )
    )
    event(log, "drained", cg=request.cg, interceptor=iid, s=engine.last_s)
