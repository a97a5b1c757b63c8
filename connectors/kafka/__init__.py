"""Kafka behind one connector: the only package that imports ``confluent_kafka``.

``producer``/``consumer``/``admin`` own the librdkafka clients (errors leave as
``pipeline.errors.KafkaError`` with code and ``retriable``: ``errors``); ``settings`` builds
every client's settings per role on ``config.KafkaConnection``; ``reading`` is the one
end-offsets reader and the one bounded range reader; ``topics`` names and creates a CG's
topics; ``deadletter`` the headers of dead-letter copies.
"""
