"""The per-role settings builders and the error mapping, without a broker.

Tries to break: a role losing a setting it depends on (read_committed everywhere, the
interceptor's fencing and ordering keys, the replay's loud reset), the shared connection
settings (TLS/SASL) not reaching every client, and an error code landing in the wrong
lowmark class or with the wrong ``retriable``.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError as CError
from confluent_kafka import KafkaException

from connectors.kafka.config import KafkaConnection, Secret
from connectors.kafka.errors import as_error
from connectors.kafka.settings import (
    ApplierSettings,
    InterceptorSettings,
    ToolSettings,
    TopologySettings,
    WatermarkSettings,
)
from pipeline.errors import FencedError, KafkaError, KafkaUnavailableError

CONN = KafkaConnection(
    "h:9093",
    security_protocol="SASL_SSL",
    sasl_mechanism="PLAIN",
    sasl_username="u",
    sasl_password=Secret("p"),
    client_id="lowmark-x",
)


def _every_client() -> dict[str, dict[str, object]]:
    w = WatermarkSettings(CONN, "cg")
    a = ApplierSettings(CONN, "cg", "site1")
    t = ToolSettings(CONN)
    i = InterceptorSettings(CONN)
    o = TopologySettings(CONN)
    return {
        "interceptor.producer": i.producer("lowmark.cg.interceptor.i1", "lz4"),
        "interceptor.cuts": i.cuts_consumer(),
        "watermark.progress": w.progress_consumer(),
        "watermark.standby": w.standby_consumer(),
        "watermark.producer": w.producer(),
        "watermark.publisher": w.publisher_producer("lowmark.cg.watermark-publisher"),
        "watermark.fencer": w.fencer_producer("lowmark.cg.interceptor.i1"),
        "watermark.admin": w.admin(),
        "applier.log": a.log_consumer(),
        "applier.wm": a.watermark_consumer(),
        "applier.producer": a.producer(),
        "tool.reader": t.reader(),
        "tool.log_reader": t.log_reader(),
        "topology.roles": o.roles_producer("lowmark.config.roles.cg"),
        "topology.reader": o.reader(),
    }


def test_every_client_carries_the_connection_settings():
    shared = CONN.librdkafka()
    for name, conf in _every_client().items():
        assert {k: conf[k] for k in shared} == shared, name


def test_every_reader_is_read_committed_and_never_auto_commits():
    for name, conf in _every_client().items():
        if "group.id" in conf:
            assert conf["isolation.level"] == "read_committed", name
            assert conf["enable.auto.commit"] is False, name


def test_role_keys_lowmark_depends_on():
    c = _every_client()
    p = c["interceptor.producer"]
    assert p["transactional.id"] == "lowmark.cg.interceptor.i1"
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    assert p["partitioner"] == "murmur2_random" and p["compression.type"] == "lz4"
    assert p["message.timeout.ms"] == p["transaction.timeout.ms"] == 300_000
    assert c["watermark.publisher"]["transaction.timeout.ms"] == 60_000
    assert c["watermark.progress"]["group.id"] == "lowmark.cg.watermark"
    assert c["applier.log"]["group.id"] == "lowmark.cg.apply.site1"
    assert c["applier.wm"]["group.id"] == "lowmark.cg.apply.site1.wm"
    for name in ("watermark.progress", "applier.log", "applier.wm", "tool.reader"):
        assert c[name]["enable.partition.eof"] is True, name
    assert c["tool.log_reader"]["auto.offset.reset"] == "error"
    assert "auto.offset.reset" not in c["tool.reader"], "short reads keep librdkafka's reset"
    assert ToolSettings(CONN).reader()["group.id"] != ToolSettings(CONN).reader()["group.id"]
    roles = c["topology.roles"]
    assert roles["transactional.id"] == "lowmark.config.roles.cg" and roles["acks"] == "all"
    assert roles["enable.idempotence"] is True and roles["transaction.timeout.ms"] == 30_000
    assert c["topology.reader"]["enable.partition.eof"] is True


@pytest.mark.parametrize(
    ("code", "fatal", "cls", "retriable"),
    [
        (CError._FENCED, True, FencedError, False),
        (CError.PRODUCER_FENCED, False, FencedError, False),
        (CError.INVALID_PRODUCER_EPOCH, False, FencedError, False),
        (CError._TRANSPORT, False, KafkaUnavailableError, True),
        (CError._TIMED_OUT, False, KafkaUnavailableError, True),
        (CError.NOT_LEADER_FOR_PARTITION, False, KafkaUnavailableError, True),
        (CError.UNKNOWN_TOPIC_OR_PART, False, KafkaError, False),
        (CError._STATE, True, KafkaError, False),
    ],
)
def test_codes_map_onto_the_error_tree(code, fatal, cls, retriable):
    err = as_error(KafkaException(CError(code, "injected", fatal=fatal)), "doing x")
    assert type(err) is cls and err.code == code
    assert err.retriable is retriable and err.fatal is fatal
    assert str(err).startswith("doing x: injected")


def test_librdkafka_retriable_and_abort_verdicts_are_kept():
    err = as_error(CError(CError._STATE, "abortable", retriable=True, txn_requires_abort=True), "c")
    assert type(err) is KafkaError and err.retriable and err.txn_requires_abort


def test_a_setting_librdkafka_refuses_is_a_lowmark_error():
    from connectors.kafka.admin import Admin
    from connectors.kafka.consumer import Consumer
    from connectors.kafka.producer import Producer

    bad = {"bootstrap.servers": "127.0.0.1:1", "no.such.setting": "1"}
    for make in (Producer, Consumer, Admin):
        with pytest.raises(KafkaError, match=r"no\.such\.setting"):
            make({**bad, "group.id": "g"} if make is Consumer else bad)
