"""The application: how an operator runs lowmark.

Owns the one configuration file and its overrides (``config``), the long-lived services
(``services``: serve, watermark, apply), Prometheus metrics (``metrics``), the ``lowmark``
command (``cli``, ``cli_services``, ``cli_ops``, ``cli_roles``) and the demo behind
``make run`` (``demo``).

May import: every room.
"""
