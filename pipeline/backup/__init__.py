"""The backup side: records with ts <= W applied to a site's images, nothing else.

Owns the pure apply plan (``plan``: per-volume ts order, fragments, epochs, blocks on bad
records, checkpoint offsets), the applier service (``applier``; ``applier_config``), how a
site follows the CG's generations (``generations``: the pure decision and the roles poll;
``follow``: the cut at a failover and the switch to the next generation), the site's files
(``images``, ``snapshots``; their layout is ``pipeline.site``), its checkpoints
(``checkpointer``) and roll-forward with reads (``extent_index``: the pure index of the
newest bytes per range; ``rollforward``: the backlog, the export that serves reads from
it, and the worker that writes it into the images).

May import: the shared ground, ``schemas``, ``connectors``, ``pipeline.topology``,
``pipeline.watermark`` (the W it applies up to).
"""
