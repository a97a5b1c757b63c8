"""The lowmark error hierarchy.

Every error a lowmark component raises on purpose derives from ``LowmarkError``.
The message says what happened and what the operator can do about it.

    LowmarkError
     ├── ConfigError                 a setting is missing, malformed or inconsistent
     ├── SetupError                  the machine lacks something (java, mvn, a free port, ...)
     │    └── KafkaStartError        a broker process did not come up (carries its log tail)
     ├── KafkaError                  talking to Kafka failed (.code, .retriable, .fatal,
     │    │                          .txn_requires_abort: librdkafka's verdict, when it gave one)
     │    ├── KafkaUnavailableError  no broker answered within the timeout   (retriable)
     │    ├── KafkaAuthError         TLS/SASL refused us (.setting: the one to fix); not
     │    │                          retriable: fix the setting and start again
     │    └── FencedError            a newer instance took over this transactional.id
     ├── RecordError                 a Kafka record we cannot trust; never applied
     │    ├── UnknownSchemaError     fingerprint / magic we do not know
     │    ├── TruncatedRecordError   the payload ends early or has trailing bytes
     │    ├── CorruptRecordError     decodes, but the values are impossible
     │    └── ChecksumMismatchError  crc32c over the record does not match
     ├── ReplicationError            a write could not be made durable in Kafka
     ├── VolumeError                 a volume operation is invalid (range, size, name)
 │    └── VolumeMovedError       the volume is not accessible here (migrated, or in a
 │                               migration's cutover): reconnect to where it is served
 ├── MigrationError              a volume migration cannot go on as asked
     ├── ClockError                  the hybrid logical clock cannot honour its promise
     ├── WatermarkError              the watermark would break an invariant (e.g. decrease)
     │    └── WatermarkHaltedError   a bad progress record froze W; operator must skip it
     ├── ApplyError                  the applier stopped; the message says why and what to do
     │    ├── ApplierHaltedError     a bad record halted the CG; operator must skip or repair
     │    └── RetentionLostError     the log no longer holds what the site needs: bootstrap it
     ├── RestoreError                a cut cannot be restored/replayed (above W, out of retention)
     ├── SnapshotError               a named snapshot cannot be taken, found or served as asked
     └── RolesError                  the roles of a CG cannot change as asked (already primary,
          │                          a cut below the generation's base)
          └── RolesConflictError     another writer changed the roles first (.retriable: re-read
                                     and retry; not retriable: it won, look before acting again)
"""

from __future__ import annotations


class LowmarkError(Exception):
    """Root of every error lowmark raises on purpose."""

    #: whether retrying the same operation later may succeed
    retriable: bool = False


class ConfigError(LowmarkError):
    """A setting is missing, malformed or inconsistent. Fix the config and restart."""


class SetupError(LowmarkError):
    """The machine lacks something lowmark needs. The message names the package or fix."""


class KafkaStartError(SetupError):
    """A Kafka broker process did not start. The message carries the tail of its log."""


class KafkaError(LowmarkError):
    """Talking to Kafka failed.

    Raised by ``connectors.kafka`` for every error librdkafka reports, carrying its
    verdict: ``code`` (librdkafka's error code, None when lowmark raised it itself),
    ``retriable`` (the same call may succeed later), ``fatal`` (the client is unusable:
    make a new one) and ``txn_requires_abort`` (abort the open transaction, then retry it).
    Callers branch on these, never on the message text.
    """

    code: int | None = None
    fatal: bool = False
    txn_requires_abort: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        code: int | None = None,
        retriable: bool | None = None,
        fatal: bool = False,
        txn_requires_abort: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        if retriable is not None:
            self.retriable = retriable
        self.fatal = fatal
        self.txn_requires_abort = txn_requires_abort


class KafkaUnavailableError(KafkaError):
    """No broker answered in time. Check bootstrap.servers and that the cluster is up."""

    retriable = True


class KafkaAuthError(KafkaError):
    """The brokers refused our TLS or SASL credentials, or a credential file is unusable.

    ``setting`` names the connection setting to fix (``sasl.password``,
    ``ssl.ca.location``, ...); the message says what was refused and how to fix it, never
    a secret. Retrying with the same settings fails the same way.
    """

    retriable = False

    def __init__(self, message: str, *, setting: str, code: int | None = None) -> None:
        super().__init__(message, code=code, retriable=False)
        self.setting = setting


class FencedError(KafkaError):
    """A newer instance (or the watermark service) fenced this interceptor.

    This instance can no longer add records. Restart it; its volumes rejoin with a
    new epoch. Writes acknowledged in async mode after its last progress were not
    replicated: resync the backup from the primary image.
    """


class RecordError(LowmarkError):
    """A record we cannot trust. It is never applied."""


class UnknownSchemaError(RecordError):
    """The payload's magic bytes or schema fingerprint are not ones this build knows."""


class TruncatedRecordError(RecordError):
    """The payload ends before the record does, or has bytes after it."""


class CorruptRecordError(RecordError):
    """The payload decodes but its values are impossible."""


class ChecksumMismatchError(RecordError):
    """The record's crc32c does not match its bytes."""


class ReplicationError(LowmarkError):
    """A write could not be made durable in Kafka; it was not acknowledged as replicated."""


class VolumeError(LowmarkError):
    """A volume operation is invalid: out of range, wrong size, unknown volume."""


class VolumeMovedError(VolumeError):
    """The volume is not accessible at this interceptor (its access state is
    ``inaccessible``): an NBD client gets ESHUTDOWN and should reconnect where it is
    served now."""


class MigrationError(LowmarkError):
    """A volume migration cannot go on as asked; the message says which side and what to do."""


class ClockError(LowmarkError):
    """The hybrid logical clock cannot keep its promise (state file unwritable, ...)."""


class WatermarkError(LowmarkError):
    """Publishing or accepting this watermark would break watermark safety."""


class WatermarkHaltedError(WatermarkError):
    """A progress record did not decode: W is frozen below it. Fix its writer, or skip it
    with ``lowmark watermark --skip-progress OFFSET`` (logged)."""


class ApplyError(LowmarkError):
    """The applier stopped."""


class ApplierHaltedError(ApplyError):
    """A bad record halted this CG's applier.

    Nothing after it is applied. Inspect the dead-letter copy, then either repair the
    producer and restart, or skip the record explicitly with ``lowmark apply --skip``.
    """


class RetentionLostError(ApplyError):
    """Retention deleted log records a backup site still needs to catch up.

    The site cannot be brought to a cut from Kafka any more. Rebuild it from a peer site's
    checkpoint copy: ``lowmark apply --site S --bootstrap-from PEER_DATA_DIR``.
    """


class SiteBusyError(LowmarkError):
    """Another process holds the site directory's lock (``state/site.lock``).

    A backup site's applier holds it while it runs; ``lowmark failover`` takes it before
    it touches the images. The message names the holder's pid: stop that process first.
    """


class RestoreError(LowmarkError):
    """A point in time cannot be restored or replayed from what Kafka and the site hold.

    Above the published W (not known to be complete), older than the log's retention and
    every snapshot, or an unknown marker. The message names the restorable range.
    """


class RolesError(LowmarkError):
    """The roles of a consistency group cannot change as asked.

    The site is already the primary, the cut lies below the current generation's base, or
    the recorded roles are not what the change expected. ``lowmark roles show`` prints them.
    """


class RolesConflictError(RolesError):
    """Another writer changed (or is changing) the roles of the CG first.

    ``retriable``: it took the roles' writer while we committed; re-read and retry. Not
    retriable: it committed another generation; the message names it, look before acting.
    """

    def __init__(self, message: str = "", *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class FailoverError(LowmarkError):
    """A failover cannot start or continue as asked.

    The site has no checkpoint or is past the cut, the primary is reachable but did not
    stop, the roles moved on while the failover ran, or its state file is unreadable. The
    message says what was (not) changed and what to run next.
    """


class SnapshotError(LowmarkError):
    """A named snapshot cannot be taken, found, restored or served as asked.

    A name in use or invalid, a copy that could not be written (disk full), a snapshot no
    site holds. The message says which site and what to do.
    """
