"""The Kafka connection settings: precedence of explicit / env / embedded, security
settings rendered for librdkafka, and every inconsistent setting rejected."""

from __future__ import annotations

import pytest

from connectors.kafka.config import KafkaConnection, Secret, from_env, resolve
from pipeline.errors import ConfigError


def test_connection_precedence_explicit_env_embedded():
    env = {"LOWMARK_BOOTSTRAP_SERVERS": "env:9092"}
    embedded = {"default": "127.0.0.1:1111"}.get
    assert resolve("cli:9092", environ=env, embedded=embedded).bootstrap_servers == "cli:9092"
    assert resolve(None, environ=env, embedded=embedded).bootstrap_servers == "env:9092"
    assert resolve(None, environ={}, embedded=embedded).bootstrap_servers == "127.0.0.1:1111"
    with pytest.raises(ConfigError, match="lowmark kafka up"):
        resolve(None, environ={}, embedded=lambda name: None)


def test_without_an_embedded_lookup_a_missing_bootstrap_fails():
    # production code passes no lookup: it never falls back to a development cluster
    with pytest.raises(ConfigError, match="LOWMARK_BOOTSTRAP_SERVERS"):
        resolve(None, environ={})


def test_connection_renders_sasl_ssl_and_hides_the_password():
    env = {
        "LOWMARK_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "LOWMARK_KAFKA_SASL_MECHANISM": "scram-sha-512",
        "LOWMARK_KAFKA_SASL_USERNAME": "replicator",
        "LOWMARK_KAFKA_SASL_PASSWORD": "hunter2",
        "LOWMARK_KAFKA_SSL_CA_LOCATION": "/etc/ssl/ca.pem",
        "LOWMARK_KAFKA_EXTRA": "socket.keepalive.enable=true, message.max.bytes=2000000",
    }
    conn = from_env(bootstrap_servers="a:9093,b:9093", environ=env)
    assert conn.librdkafka() == {
        "bootstrap.servers": "a:9093,b:9093",
        "security.protocol": "SASL_SSL",
        "client.id": "lowmark",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "replicator",
        "sasl.password": "hunter2",
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "socket.keepalive.enable": "true",
        "message.max.bytes": "2000000",
    }
    assert "hunter2" not in repr(conn) and "hunter2" not in str(conn)
    assert conn.with_client_id("applier").librdkafka()["client.id"] == "applier"
    assert KafkaConnection("h:1", sasl_password=None) == KafkaConnection("h:1")
    assert Secret("x") == Secret("x") and "x" not in repr(Secret("x"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap_servers": ""}, "empty"),
        ({"bootstrap_servers": "localhost"}, "host:port"),
        ({"bootstrap_servers": "h:99999"}, "host:port"),
        ({"security_protocol": "TLS"}, "not one of"),
        ({"security_protocol": "SASL_SSL"}, "needs a SASL mechanism"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
          "sasl_password": "p"}, "username and a password"),
        ({"sasl_username": "u"}, "would be ignored"),
        ({"ssl_ca_location": "/ca.pem"}, "would be ignored"),
        ({"security_protocol": "SSL", "ssl_certificate_location": "/c.pem"}, "ssl.key.location"),
        ({"extra": {"bootstrap.servers": "other:1"}}, "redefine"),
        ({"security_protocol": "SSL", "ssl_endpoint_identification_algorithm": "off"},
         "is not 'https'"),
        ({"ssl_endpoint_identification_algorithm": "none"}, "would be ignored"),
    ],
)
def test_connection_rejects_inconsistent_settings(kwargs, message):
    args = {"bootstrap_servers": "127.0.0.1:9092", **kwargs}
    with pytest.raises(ConfigError, match=message):
        KafkaConnection(**args)


def test_endpoint_identification_is_read_from_the_environment_and_rendered():
    env = {"LOWMARK_KAFKA_SECURITY_PROTOCOL": "ssl",
           "LOWMARK_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "NONE"}  # fmt: skip
    conf = from_env(bootstrap_servers="a:9093", environ=env).librdkafka()
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    # unset: librdkafka's own default (https) stands, not a value of ours
    plain = from_env(bootstrap_servers="a:9093", environ={"LOWMARK_KAFKA_SECURITY_PROTOCOL": "SSL"})
    assert "ssl.endpoint.identification.algorithm" not in plain.librdkafka()
