"""Operator tools on the log and a site: replay, restore --at, verify, tail, status, drill.

Owns the replay engine (``replay``) and the tools built on it. Nothing here runs on the
data path; every tool reads Kafka and a site and writes only where the operator says.

May import: the shared ground, ``schemas``, ``connectors``, ``pipeline.topology``,
``pipeline.primary``, ``pipeline.watermark``, ``pipeline.backup``.
"""
