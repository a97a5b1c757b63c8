"""The primary side: everything between a write arriving and its record in Kafka.

Owns the hybrid logical clock (``clock``), the volume API and its modes (``volume``), the
tick batch and its records (``outbox``), the replicating interceptor and its tickets
(``interceptor``), the follower of published cuts that sync acknowledgements wait on
(``cut_follower``), the NBD face of a replicating volume (``nbd_volume``), the
interceptor's settings (``engine_config``), the roles watch that fences an interceptor of
a superseded generation (``generation_watch``) and the Kafka fencing of a generation's
interceptors a failover uses (``fencing``).

May import: the shared ground, ``schemas``, ``connectors``, ``pipeline.topology``, and
``pipeline.watermark.state`` (the pure rules of the watermark protocol: an interceptor
obeys the JOIN clock floor).
"""
