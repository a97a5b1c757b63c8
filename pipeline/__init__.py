"""lowmark's pipeline: one room per role along the data path.

A write walks the rooms in this order; a room may import the rooms before it (and the
shared ground), never one after it:

    topology/   the roles of a CG: its generation and primary, in ``lowmark.config``; the
                pure rules of a failover and their compare-and-set commit
    primary/    a volume's writes are stamped (HLC), batched with progress into one Kafka
                transaction per tick, and acknowledged per mode
    watermark/  the progress log folded into W, the consistent cut over every interceptor
    backup/     records with ts <= W applied to the site's images, checkpointed
    ops/        operator tools on the log and the site: restore, replay, verify, tail,
                status, drill (test failover)
    app/        configuration, the long-lived services, metrics, the `lowmark` command, demo

Shared ground, importable from every room: ``errors`` (the ``LowmarkError`` tree), ``logs``
(structured log lines), ``fault_streak`` (when a passing fault is said), ``fsutil``
(durable file writes), ``timesource`` (the injectable
time every service runs on), ``site`` (``SiteDir``, the one layout of a site directory,
the primary's and a backup's alike) and ``snapshot_store`` (a site's named snapshots,
the same at the primary and at a backup). Below the rooms: ``schemas`` (records and the ts
encoding) and ``connectors`` (Kafka, NBD, image files), which import no room.
tests/test_layout.py holds the tree to these rules.
"""
