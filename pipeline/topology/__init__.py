"""The topology of a consistency group: which site is its primary, in which generation.

Owns the pure rules of a change of roles (``roles``: the next generation after a failover
or switchover, the refusals, the idempotency check a re-run relies on) and their one home
in Kafka (``store``: the compacted ``lowmark.config``, written through one transactional
writer per CG, compare-and-set on the generation). Every other room may read it: the
generation decides which topics a service uses.

May import: the shared ground, ``schemas``, ``connectors``.
"""
