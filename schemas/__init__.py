"""lowmark's Avro record schemas (``*.avsc``) and their codec (``schemas.codec``).

The wire format and the rules for evolving a schema are in ``schemas/README.md``.
"""
