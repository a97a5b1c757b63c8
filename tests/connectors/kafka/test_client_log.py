"""librdkafka's log lines reach lowmark's logging as fields, said once, never raw on stderr.

Tries to break: several clients retrying an unreachable broker every second (one warning
per broker per quiet period, with the count held back), a line in a shape we do not parse
(kept as it is), broker names with a security protocol, and a real client's lines leaking
to stderr as ``%3|...``.
"""

from __future__ import annotations

import logging
import time

from connectors.embedded_kafka.procs import free_port
from connectors.kafka.client_log import LOGGER, OncePerBroker
from connectors.kafka.producer import Producer

REFUSED = ("[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 "
           "failed: Connection refused (after 0ms in state CONNECT)")  # fmt: skip


def record(fac: str, client: str, text: str) -> logging.LogRecord:
    return logging.LogRecord(LOGGER, logging.ERROR, "", 0, "%s [%s] %s", (fac, client, text),
                             None)  # fmt: skip


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_an_unreachable_broker_is_said_once_per_quiet_period_across_clients():
    clock = Clock()
    f = OncePerBroker(quiet_s=60, now=clock)
    first = record("FAIL", "lowmark#producer-1", REFUSED)
    assert f.filter(first)
    assert first.getMessage().startswith("cannot reach Kafka broker 127.0.0.1:1/bootstrap: ")
    assert "bootstrap.servers" in first.getMessage()
    assert first.levelno == logging.WARNING  # lowmark retries: not an error yet
    assert (first.fac, first.client, first.broker) == ("FAIL", "lowmark#producer-1",
                                                       "127.0.0.1:1/bootstrap")  # fmt: skip
    # the same broker from other clients, other failures, other millisecond counts
    for i in range(5):
        clock.t += 1
        text = REFUSED.replace("after 0ms", f"after {i}ms")
        assert not f.filter(record("FAIL", f"lowmark#consumer-{i}", text))
    assert not f.filter(record("FAIL", "x", "127.0.0.1:1/bootstrap: Disconnected (after 3ms)"))
    clock.t = 60.5
    again = record("FAIL", "lowmark#producer-1", REFUSED)
    assert f.filter(again)
    assert again.held_back == 6
    # another broker is its own news
    other = REFUSED.replace("127.0.0.1:1", "10.0.0.2:9092")
    assert f.filter(record("FAIL", "lowmark#producer-1", other))


def test_protocol_prefixed_broker_names_and_other_lines():
    f = OncePerBroker(quiet_s=60, now=Clock())
    tls = record("FAIL", "c", "sasl_ssl://kafka-1.example:9093/2: Connect to ipv4#10.1.1.1:9093 "
                 "failed: Connection refused")  # fmt: skip
    assert f.filter(tls) and tls.broker == "sasl_ssl://kafka-1.example:9093/2"
    note = record("GETPID", "p", "Failed to acquire transactional PID from broker 3: retrying")
    assert f.filter(note) and note.getMessage().startswith("Kafka client: Failed to acquire")
    assert note.broker == ""
    # the same text with another number is a repeat; another text is not
    assert not f.filter(record("GETPID", "p", "Failed to acquire transactional PID from "
                               "broker 1: retrying"))  # fmt: skip
    assert f.filter(record("GETPID", "p", "something else"))
    # a record not in confluent-kafka's shape passes untouched
    plain = logging.LogRecord(LOGGER, logging.INFO, "", 0, "hello %s", ("x",), None)
    assert f.filter(plain) and plain.getMessage() == "hello x"


def test_a_real_client_logs_through_lowmark_not_onto_stderr(caplog, capfd):
    caplog.set_level(logging.INFO, logger=LOGGER)
    closed = f"127.0.0.1:{free_port()}"  # a broker no other test has just been refused by
    producers = [Producer({"bootstrap.servers": closed, "reconnect.backoff.ms": 100})
                 for _ in range(3)]  # fmt: skip
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for p in producers:
            p.poll(0.1)
    err = capfd.readouterr().err
    assert "%3|" not in err and "|FAIL|" not in err, err[-2000:]
    said = [r for r in caplog.records if r.name == LOGGER and "cannot reach" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].broker == f"{closed}/bootstrap"
