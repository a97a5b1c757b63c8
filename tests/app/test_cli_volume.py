"""`lowmark volume` finds the running primary from the config file alone.

Tries to break: the admin socket read from ``--config`` ([serve] data_dir) failing on the
Kafka settings `volume` does not use (a placeholder bootstrap the connection refuses).
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import pytest

from pipeline.app import cli
from pipeline.app.admin import AdminClient, AdminServer, default_admin_socket


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


def test_the_admin_socket_works_under_a_data_dir_deeper_than_a_socket_address(tmp_path):
    """CI's tmp dir made ``<data_dir>/state/admin.sock`` longer than sun_path's 108 bytes;
    the default socket refused to start (seen failing in `make run`'s test)."""
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 4) / "state" / "admin.sock"
    assert len(str(deep)) > 108

    class Group:
        volumes: dict = {}
        parking = SimpleNamespace(parked={})

    async def serve_and_ask():
        server = AdminServer(Group(), deep, on_volume=lambda _vol: None)  # type: ignore[arg-type]
        await server.start()
        try:
            return await asyncio.to_thread(AdminClient(deep, timeout_s=10).request, {"op": "list"})
        finally:
            await server.close()

    assert asyncio.run(serve_and_ask()) == {"ok": True, "volumes": [], "parked": []}
    assert not deep.exists()  # close removed the socket file itself
