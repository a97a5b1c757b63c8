"""The roles of every CG in Kafka: the compacted topic ``lowmark.config``, key ``roles/<cg>``.

Reading (``RolesStore.latest``) is a bounded read_committed read of the topic's one
partition: of the records under the CG's key, the highest generation wins. A record that
does not decode (or names another CG) is skipped with a warning and counted in
``skipped``, never trusted; a record half-written by a writer that died is never seen (it
was in an open transaction, aborted when the next writer took over).

Writing (``RolesStore.commit``) is compare-and-set on Kafka, through ONE transactional
writer per CG (``transactional.id`` = ``lowmark.config.roles.<cg>``):

1. ``init_transactions`` takes the id: a concurrent writer is fenced, and whatever it left
   open is decided (committed or aborted) before this returns;
2. re-read the latest committed roles and check the precondition (the expected
   generation); if the roles already are what we wanted (a re-run after a crash), return
   them; if another writer got there first, raise ``RolesConflictError`` naming it;
3. produce the new roles and commit, and return once readers see them. A writer fenced in
   between lost the race: ``RolesConflictError`` with ``retriable`` set, and nothing of it
   is visible.

So two writers with the same expected generation never both commit: one of them always
takes the id after the other's transaction is decided, and then sees it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, read_range
from connectors.kafka.settings import TopologySettings
from connectors.kafka.topics import CONFIG_TOPIC, ensure_config_topic, roles_key
from connectors.kafka.topics import roles_transactional_id as _txid
from pipeline.errors import (
    FencedError,
    KafkaError,
    KafkaUnavailableError,
    RecordError,
    RolesConflictError,
    RolesError,
)
from pipeline.logs import event
from pipeline.topology.roles import already_applied
from schemas import codec
from schemas.records import CgRoles

__all__ = ["PHASES", "RolesStore", "current_generation"]

log = logging.getLogger("lowmark.topology")

#: the points of ``commit`` a phase hook is called at, in order (kill -9 tests stop there)
PHASES = ("fenced", "checked", "produced", "committed")


class RolesStore:
    """The roles of the CGs of one Kafka cluster.

    ``phase_hook(phase)`` is called at each of ``PHASES`` during ``commit`` (tests and
    the orchestrator's crash drills stop a writer there; the default does nothing).
    """

    def __init__(
        self,
        kafka_conf: Mapping[str, Any],
        *,
        timeout_s: float = 30.0,
        replication_factor: int | None = None,
        phase_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.conf: dict[str, Any] = dict(kafka_conf)
        self.timeout_s = timeout_s
        self.replication_factor = replication_factor
        self._hook = phase_hook or (lambda _phase: None)
        #: records under a roles key that did not decode or named another CG, so far
        self.skipped = 0
        self._topic_ready = False

    # ---------------------------------------------------------------- reading

    def records(self, cg: str) -> list[tuple[int, CgRoles]]:
        """Every committed, decodable roles record of ``cg`` still in the topic, with its
        offset, in offset order (compaction keeps at least the latest)."""
        b = bounds(self.conf, CONFIG_TOPIC, self.timeout_s)
        if b is None or 0 not in b:
            return []  # no topic yet: no CG has roles
        low, end = b[0]
        if end <= low:
            return []
        key = roles_key(cg).encode()
        out: list[tuple[int, CgRoles]] = []
        settings = TopologySettings(self.conf).reader()
        for msg in read_range(
            settings,
            CONFIG_TOPIC,
            # from the known low offset: resolving BEGINNING costs a new consumer ~0.5 s
            # (measured: the failover's first read waited for it)
            {0: low},
            {0: end},
            stall_timeout_s=self.timeout_s,
            timeout_s=self.timeout_s,
        ):
            if msg.key() != key or msg.value() is None:
                continue  # another object's record, or a tombstone (roles are never deleted)
            try:
                rec = codec.decode(msg.value(), CgRoles)
            except RecordError as exc:
                self._skip(cg, msg.offset(), str(exc))
                continue
            if rec.cg != cg:
                self._skip(cg, msg.offset(), f"the record names CG {rec.cg!r}")
                continue
            out.append((msg.offset(), rec))
        return out

    def latest(self, cg: str) -> CgRoles | None:
        """The committed roles of ``cg`` (highest generation); None: generation 0, no roles
        recorded."""
        best: CgRoles | None = None
        for _offset, rec in self.records(cg):
            if best is None or rec.generation >= best.generation:
                best = rec
        return best

    def _skip(self, cg: str, offset: int, why: str) -> None:
        self.skipped += 1
        event(
            log,
            "skipped a roles record that cannot be trusted; it is ignored. Find its writer "
            "(kcat -C -t lowmark.config -o OFFSET -c 1 -f '%k %h')",
            logging.WARNING,
            cg=cg,
            topic=CONFIG_TOPIC,
            offset=offset,
            why=why,
        )

    # ---------------------------------------------------------------- writing

    def ensure_topic(self) -> None:
        if not self._topic_ready:
            ensure_config_topic(
                self.conf, replication_factor=self.replication_factor, timeout_s=self.timeout_s
            )
            self._topic_ready = True

    def commit(self, cg: str, expected_generation: int | None, roles: CgRoles) -> CgRoles:
        """Commit ``roles`` if the committed roles of ``cg`` are at ``expected_generation``
        (None: no roles recorded); returns what is committed.

        If the committed roles already equal ``roles`` (``already_applied``: a re-run after
        a crash), returns them and writes nothing. Raises ``RolesConflictError`` when
        another writer won (``retriable``: it fenced us mid-commit, re-read and retry;
        else it committed another generation, named in the message), ``RolesError`` when
        ``roles`` is not the generation after ``expected_generation``.
        """
        # no record is generation 0 unrecorded: its successor is its record
        # (``initial_roles``) or generation 1 planned from nothing (``plan_failover(None,
        # ...)``: one transition, from no recorded primary)
        want = 0 if expected_generation is None else expected_generation + 1
        last = roles.last_transition
        if expected_generation is None and len(roles.history) == 1 and last and not last.from_site:
            want = 1
        if roles.cg != cg or roles.generation != want:
            raise RolesError(
                f"cannot commit generation {roles.generation} of CG {roles.cg!r} as the "
                f"successor of generation {expected_generation} of {cg!r}: plan it from the "
                "latest roles (pipeline.topology.roles.plan_failover)"
            )
        payload = codec.encode(roles)  # an impossible record fails here, before any client
        self.ensure_topic()
        txid = _txid(cg)
        producer = Producer(TopologySettings(self.conf).roles_producer(txid))
        try:
            producer.init_transactions(self.timeout_s)
            self._hook("fenced")
            current = self.latest(cg)
            have = None if current is None else current.generation
            if have != expected_generation:
                if current is not None and already_applied(current, roles):
                    event(log, "roles already committed", cg=cg, generation=current.generation)
                    return current
                raise RolesConflictError(_lost(cg, expected_generation, current))
            self._hook("checked")
            producer.begin_transaction()
            producer.produce(
                CONFIG_TOPIC, payload, key=roles_key(cg), headers=codec.headers_for(roles)
            )
            # on the brokers, inside the open transaction: what a writer that dies now
            # leaves behind (commit would flush anyway)
            producer.flush(self.timeout_s)
            self._hook("produced")
            producer.commit_transaction(self.timeout_s)
        except FencedError as exc:
            raise RolesConflictError(
                f"another writer took {txid} while this one committed generation {want} of "
                f"CG {cg!r} ({exc}); nothing of this attempt is visible: re-read the roles "
                "and retry",
                retriable=True,
            ) from None
        except KafkaError as exc:
            if exc.txn_requires_abort:
                # if this fails too, the next writer's init_transactions aborts it
                with contextlib.suppress(KafkaError):
                    producer.abort_transaction(self.timeout_s)
            raise
        self._hook("committed")
        self._await_visible(cg, roles)
        event(
            log,
            "roles committed",
            cg=cg,
            generation=roles.generation,
            primary_site=roles.primary_site,
            base_w=roles.base_w,
        )
        return roles

    def _await_visible(self, cg: str, roles: CgRoles) -> None:
        """Wait until readers see ``roles``: commit_transaction returns once the commit is
        decided, but the partition's transaction marker (which lets read_committed readers
        past the record) is written just after. Returning only once it is readable makes
        a commit read-your-writes for the caller and for every later reader."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            seen = self.latest(cg)
            if seen is not None and seen.generation >= roles.generation:
                return
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"generation {roles.generation} of CG {cg!r} is committed but not readable "
                    f"after {self.timeout_s} s; check the brokers. A re-run completes without "
                    "writing it again"
                )
            time.sleep(0.02)


def current_generation(conf: Mapping[str, Any], cg: str) -> int:
    """The CG's generation now (0 when no roles are recorded)."""
    roles = RolesStore(conf).latest(cg)
    return 0 if roles is None else roles.generation


def _lost(cg: str, expected: int | None, current: CgRoles | None) -> str:
    if current is None:
        now = "no roles are recorded"
    else:
        last = current.last_transition
        how = (
            f", by a {last.kind.value} from {last.from_site or 'an unrecorded primary'} "
            f"at W {last.w}"
            if last is not None
            else ""
        )
        now = (
            f"the roles are at generation {current.generation} (primary "
            f"{current.primary_site!r}{how}, written at {current.updated_us} us)"
        )
    was = "no roles" if expected is None else f"generation {expected}"
    return (
        f"CG {cg!r}: expected {was}, but {now}: another writer won. Look at them "
        "(`lowmark roles show`) before deciding again"
    )
