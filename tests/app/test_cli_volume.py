"""`lowmark volume` finds the running primary from the config file alone.

Tries to break: the admin socket read from ``--config`` ([serve] data_dir) failing on the
Kafka settings `volume` does not use (a placeholder bootstrap the connection refuses).
"""

from __future__ import annotations

import sys

import pytest

from pipeline.app import cli
from pipeline.app.admin import default_admin_socket


def test_volume_reads_the_admin_socket_from_the_config(tmp_path, monkeypatch, capsys):
    config = tmp_path / "lowmark.toml"
    config.write_text(f'[serve]\ndata_dir = "{tmp_path / "primary"}"\n')
    monkeypatch.delenv("LOWMARK_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setattr(sys, "argv", ["lowmark", "volume", "list", "--config", str(config)])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    err = capsys.readouterr().err
    # no primary runs: the error is about its socket, not about Kafka
    assert exited.value.code != 0
    assert "bootstrap" not in err, err
    assert str(default_admin_socket(tmp_path / "primary")) in err, err
