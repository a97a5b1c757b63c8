"""The embedded Kafka cluster: a development and test tool, not production plumbing.

Fetches Apache Kafka's jars from Maven Central with mvn and runs 1- or 3-node KRaft
clusters on loopback, for `make run`, `lowmark demo`, the tests and the benches. A
production deployment points lowmark at its own Kafka and never imports this package;
nothing in ``connectors/kafka`` or ``pipeline/`` (but the app layer's CLI and demo, which
inject :func:`~connectors.embedded_kafka.state.find_bootstrap`) may import it.

    jars.py     the pom (packaged, or ``LOWMARK_KAFKA_POM``), its Kafka version, the jar cache
    java.py     finding ``java`` and checking it is new enough
    procs.py    process liveness by PID and command line, loopback ports, log tails
    state.py    where a cluster lives and its ``cluster.json`` record (find_bootstrap)
    node.py     what each node JVM is started with: properties, log4j2, JVM flags, CDS
    cluster.py  :class:`KafkaCluster`: start, stop, kill and restart nodes, wait until ready
    cli.py      ``lowmark kafka up/down/status/fetch``
"""
