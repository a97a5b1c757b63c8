"""The watermark: W, the consistent cut over every interceptor of a consistency group.

Owns the pure fold of the progress log (``state``: deterministic, no I/O, the silence and
epoch rules), the CG's single W writer (``publisher``: one transactional.id, one
transaction per W, never lower than the last), and the service that reads progress,
fences the silent and stands by or takes over (``service``), each for one generation of
the CG, and the service that follows the roles from one generation to the next
(``generations``).

May import: the shared ground, ``schemas``, ``connectors``, ``pipeline.topology``.
"""
