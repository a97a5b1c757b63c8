"""Two ``lowmark serve`` of one CG (``primary-a`` with the volumes, ``primary-b`` empty),
its watermark service and a backup site, run as an operator runs them, and the
``lowmark migrate`` command between them."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from pipeline.app.admin import AdminClient, default_admin_socket
from tests.cli_services import CgServices
from tests.replication_helpers import wait_until


class TwoPrimaries(CgServices):
    JOBS = {"serve": "lowmark-serve", "serve_b": "lowmark-serve-b",
            "watermark": "lowmark-watermark", "apply": "lowmark-apply"}  # fmt: skip

    def __init__(self, tmp: Path, bootstrap: str, cg: str, **config: Any) -> None:
        from connectors.embedded_kafka.procs import free_port

        super().__init__(tmp, bootstrap, cg, **config)
        self.nbd_port_b = free_port()
        text = self.config.read_text()
        head, _, rest = text.partition("[serve]\n")
        _serve_a, _, tail = rest.partition("[watermark]\n")
        serve_b = (
            'interceptor_id = "primary-b"\n'
            f'data_dir = "{tmp / "primary-b"}"\n'
            f'listen = "127.0.0.1:{self.nbd_port_b}"\n'
            f'metrics = "127.0.0.1:{self.ports["serve_b"]}"\n'
            "tick_interval_ms = 5\n"
        )
        self.config_b = tmp / "lowmark-b.toml"
        self.config_b.write_text(f"{head}[serve]\n{serve_b}\n[watermark]\n{tail}")
        self.admin = {"primary-a": default_admin_socket(tmp / "primary"),
                      "primary-b": default_admin_socket(tmp / "primary-b")}  # fmt: skip
        self.nbd = {"primary-a": self.nbd_port, "primary-b": self.nbd_port_b}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """As ``CliServices.start``, but a restart appends to the log (kill tests)."""
        config, args = (self.config_b, ("serve",)) if name == "serve_b" else (self.config, args)
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(self.argv(*(args or (name,)), "--config", str(config)),
                                stdout=log, stderr=subprocess.STDOUT, env=self.env)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        for name in self.JOBS:
            self.start(name)
        for name, up in (("serve", "lowmark_primary_up"), ("serve_b", "lowmark_primary_up"),
                         ("apply", "lowmark_applier_up")):  # fmt: skip
            wait_until(lambda n=name, m=up: self.numbers(n).get(m) == 1.0, 60, f"{name} up")

    def ask(self, iid: str, req: dict[str, Any]) -> dict[str, Any]:
        return AdminClient(self.admin[iid], timeout_s=5).request(req)

    def states(self, volume: str) -> dict[str, str]:
        """Each interceptor's state of ``volume`` ('down' when it does not answer)."""
        out = {}
        for iid in self.admin:
            try:
                a = self.ask(iid, {"op": "migrate", "step": "state", "volume": volume})
                out[iid] = a.get("state", "?")
            except Exception:
                out[iid] = "down"
        return out

    def migrate(self, volume: str, to: str, *extra: str, timeout: float = 120,
                source: str | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        src = source or ("primary-b" if to == "primary-a" else "primary-a")
        argv = self.argv("migrate", volume, "--to", to, "--admin-socket", str(self.admin[src]),
                         "--to-admin", str(self.admin[to]), "--json", *extra)  # fmt: skip
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=self.env)

    def migrate_ok(self, volume: str, to: str, *extra: str) -> dict[str, Any]:
        r = self.migrate(volume, to, *extra)
        assert r.returncode == 0, (r.stdout.decode() + r.stderr.decode())[-4000:]
        out: dict[str, Any] = orjson.loads(r.stdout.strip().splitlines()[-1])
        return out


@contextlib.contextmanager
def running(tmp: Path, bootstrap: str, cg: str,
            volumes: tuple[tuple[str, str, str], ...]) -> Iterator[TwoPrimaries]:  # fmt: skip
    """A started ``TwoPrimaries``; its logs printed if the block fails, all killed after."""
    svc = TwoPrimaries(tmp, bootstrap, cg, volumes=volumes)
    try:
        svc.start_all()
        yield svc
    except BaseException:
        svc.dump_logs()
        raise
    finally:
        svc.kill_all()
