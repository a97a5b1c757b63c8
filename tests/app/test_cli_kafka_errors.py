"""A Kafka failure under any ``lowmark`` command ends as one line naming what to do, exit 2.

Tries to break: a command whose Kafka is unreachable must not print a traceback or a raw
``KafkaException`` (the CLI has no handler for one: ``connectors.kafka`` hands on every
librdkafka error as a ``KafkaError``, a LowmarkError).
"""

from __future__ import annotations

import sys

import pytest

from pipeline.app import cli


def test_unreachable_kafka_is_a_one_line_lowmark_error(monkeypatch, capsys):
    # tail: its first Kafka call (the log's partitions) fails after its 10 s timeout
    args = ["lowmark", "tail", "--no-follow", "--bootstrap-servers", "127.0.0.1:1", "--cg", "x"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exited:
        cli.run()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lowmark: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "KafkaException" not in err
    assert "127.0.0.1:1" in lines[0] or "brokers" in lines[0], lines[0]
