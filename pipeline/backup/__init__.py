"""The backup side: records with ts <= W applied to a site's images, nothing else.

Owns the pure apply plan (``plan``: per-volume ts order, fragments, epochs, blocks on bad
records, checkpoint offsets), the applier service (``applier``), the site's files
(``site``, ``images``, ``snapshots``) and its checkpoints.

May import: the shared ground, ``schemas``, ``connectors``, ``pipeline.primary.clock``,
``pipeline.watermark`` (the W it applies up to).
"""
