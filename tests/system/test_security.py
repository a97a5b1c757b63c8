"""The security matrix on the embedded broker: TLS, mutual TLS, SASL/SCRAM-SHA-256/512.

Per mode, one secured 1-node cluster; on it `lowmark serve | watermark | apply` as an
operator runs them, written to by qemu-io over NBD, then every tool once, and kcat.

Tries to break: a service or tool that ignores the [kafka] security settings (or the
LOWMARK_KAFKA_* variables: two modes use each) somewhere among its clients; a backup that
differs from the primary over a secured link; a wrong password, unknown user, untrusted
CA, expired / untrusted / missing client certificate or a broker certificate naming
another host that hangs "connecting", fails after 30 s, blames the wrong setting, or lets
a single record through; a password or private key in any log line, message or /metrics.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.security import CLIENT_USER, Certs, ClusterSecurity, make_certs
from connectors.image.image import file_digest
from connectors.kafka.topics import CgTopics
from pipeline.ops.status import scrape
from pipeline.site import SiteDir
from tests.kcat import kcat_consume
from tests.prereqs import require_tools
from tests.replication_helpers import read_log, wait_until
from tests.system.security_scene import (
    PASSWORD,
    Done,
    Scene,
    leaks,
    log_end_offsets,
    qemu_write,
    run_parallel,
    secrets_of,
    settings,
    start_cluster,
)
from tests.torture_summary import record

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

MODES = ("tls", "mtls", "scram-sha-256", "scram-sha-512")
#: how lowmark is given the settings in each mode: the config file or the environment
VIA = {"tls": "file", "mtls": "env", "scram-sha-256": "file", "scram-sha-512": "env",
       "wrong-host": "file"}  # fmt: skip
WRONG_PASSWORD = "Wrong-" + uuid.uuid4().hex
#: an operator waits this long for a verdict (issue 16)
VERDICT_S = 30.0


@dataclass
class Secured:
    mode: str
    security: ClusterSecurity
    cluster: KafkaCluster
    certs: Certs

    def conf(self, **override: str | None) -> dict[str, str]:
        """librdkafka settings of a good client (or one with ``override``)."""
        return {"bootstrap.servers": self.cluster.bootstrap_servers,
                **settings(self.security, **override)}  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require_tools("qemu-io")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secured(request, certs, tmp_path_factory) -> Iterator[Secured]:
    """The cluster of ``request.param`` (a mode, or ``wrong-host``: TLS brokers whose
    certificate names only wrong.invalid)."""
    mode = request.param
    users = {CLIENT_USER: PASSWORD} if mode.startswith("scram") else {}
    sec = ClusterSecurity("tls" if mode == "wrong-host" else mode, certs, users=users,
                          wrong_host=mode == "wrong-host")  # fmt: skip
    with start_cluster(tmp_path_factory.mktemp(f"kafka-{mode}"), sec) as cluster:
        yield Secured(mode, sec, cluster, certs)


def _no_leaks(texts: dict[str, str], secrets: list[str]) -> int:
    found = {name: hit for name, text in texts.items() if (hit := leaks(text, secrets))}
    assert not found, f"secrets in: {found}"
    return len(texts)


#: make test runs the services and tools on mutual TLS and SASL_SSL/SCRAM-SHA-512 (the
#: TLS and SCRAM code paths both); plain TLS and SCRAM-SHA-256 go under make torture
#: (~100 s a mode on a quiet machine). Every mode's bad cases run in make test.
SERVICE_MODES = [pytest.param(m, marks=pytest.mark.torture) if m in ("tls", "scram-sha-256")
                 else m for m in MODES]  # fmt: skip


# ~100 s on a quiet machine; 250 s measured under a load average of 40 on 2 cores
@pytest.mark.timeout(600)
@pytest.mark.parametrize("secured", SERVICE_MODES, indirect=True)
def test_services_and_tools_run_on_a_secured_cluster(secured, tmp_path, unique_name):
    t0 = time.monotonic()
    mode, good = secured.mode, secured.conf()
    scene = Scene(tmp_path, good["bootstrap.servers"], unique_name, settings(secured.security),
                  VIA[mode])  # fmt: skip
    backup, primary = SiteDir(tmp_path / "backup"), SiteDir(tmp_path / "primary")
    texts: dict[str, str] = {}
    done: dict[str, Done] = {}
    phases: dict[str, float] = {}
    try:
        for name in ("serve", "watermark", "apply"):
            scene.start(name)
        wait_until(lambda: scrape(f"127.0.0.1:{scene.ports['serve']}").get("lowmark_primary_up")
                   == 1.0, 60, "serve's /metrics")  # fmt: skip
        wait_until(lambda: scrape(f"127.0.0.1:{scene.ports['apply']}").get("lowmark_applier_up")
                   == 1.0, 60, "apply's /metrics")  # fmt: skip
        phases["services up"] = time.monotonic() - t0
        nbd = f"nbd://127.0.0.1:{scene.nbd_port}"
        qemu_write(f"{nbd}/vol1", "write -P 0xa1 0 1M", "write -z 2M 64k", "flush")
        done["volume create"] = scene.run("volume", "create", "vol2", "8MiB").ok()
        qemu_write(f"{nbd}/vol2", "write -P 0xb2 4096 128k", "flush")
        # a marker needs a published W that includes the interceptor: the first may be early
        deadline = time.monotonic() + 60
        while (m := scene.run("marker", "m1", "--json", "--timeout-s", "5")).returncode != 0:
            assert time.monotonic() < deadline, f"no marker in 60 s: {m.stderr[-2000:]}"
        done["marker"] = m
        marker_ts = orjson.loads(m.stdout)["ts"]
        done["snapshot create"] = scene.run("snapshot", "create", "s1", "--timeout-s", "5").ok()
        done["volume list"] = scene.run("volume", "list", "--json").ok()
        qemu_write(f"{nbd}/vol1", "write -P 0xc3 4M 512k", "flush")  # after the marker
        phases["marker, snapshot, volumes"] = time.monotonic() - t0
        for name in ("serve", "watermark", "apply"):
            texts[f"/metrics of {name}"] = scene.metrics(name)
        assert scene.stop("serve") == 0
        want = {v: file_digest(primary.image_path(v)) for v in ("vol1", "vol2")}

        def converged() -> bool:
            return all(backup.image_path(v).exists() and file_digest(backup.image_path(v)) == d
                       for v, d in want.items())  # fmt: skip

        wait_until(converged, 60, "the backup to equal the primary", interval_s=0.5)
        phases["converged"] = time.monotonic() - t0
        # a graceful stop checkpoints with digests, which verify compares (a running
        # `lowmark apply`'s checkpoints carry none: [apply] cannot ask for them)
        assert scene.stop("apply") == 0
        restored = tmp_path / "restored"
        done.update(run_parallel({
            "status": (scene, ("status", "--json")),
            "topology": (scene, ("topology", "--json")),
            "tail": (scene, ("tail", "--no-follow", "--json")),
            "verify": (scene, ("verify", "--site", "dr1", "--site-dir", str(backup.root))),
            "snapshot list": (scene, ("snapshot", "list", "--json")),
            "roles show": (scene, ("roles", "show", "--json")),
            "restore": (scene, ("restore", "--marker", "m1", "--to", str(restored))),
        }, at_once=8))  # fmt: skip
        for d in done.values():
            d.ok()
        # the W the stopped site checkpointed, exactly (a scrape has its physical part only)
        w = orjson.loads(done["status"].stdout)["sites"]["dr1"]["checkpoint_w"]
        done["replay"] = scene.run("replay", "--from-ts", str(marker_ts), "--to-ts", str(w),
                                   "--images", str(restored)).ok()  # fmt: skip
        assert scene.stop("watermark") == 0
        phases["tools"] = time.monotonic() - t0
    except BaseException:
        scene.kill_all()
        for name in scene.procs:
            print(f"----- {name} log -----\n{scene.log(name)[-4000:]}")
        raise
    # what the tools said is what happened
    assert {v: file_digest(SiteDir(restored).image_path(v)) for v in want} == want
    assert "s1" in done["snapshot list"].stdout
    assert len(done["tail"].stdout.splitlines()) > 0
    log = read_log(good, unique_name)
    assert len(log) > 0
    kcat = kcat_consume(good, CgTopics(unique_name).log, tmp_path)
    assert sorted(kcat) == sorted(f"{p}:{o}" for _t, _r, p, o in log), "kcat read another log"
    for name in scene.procs:
        texts[f"{name} log"] = scene.log(name)
    for key, d in done.items():
        texts[f"lowmark {key}"] = d.stdout + d.stderr
    checked = _no_leaks(texts, secrets_of(secured.security, secured.certs))
    seconds = time.monotonic() - t0
    record(f"security {mode}: services+tools", faults=0, checked=checked, violations=0,
           checked_what="logs/outputs/metrics free of secrets; backup, restore+replay equal "
           "primary", seconds=seconds, commands=len(done) + 3,
           tool_s={k: round(d.seconds, 1) for k, d in done.items()},
           phases_s={k: round(v, 1) for k, v in phases.items()})  # fmt: skip
    print("phases (s from start):", phases, "tools:", {k: round(d.seconds, 1) for k, d in done.items()})  # noqa: E501


def _bad_cases(s: Secured) -> list[tuple[str, dict[str, str | None], str]]:
    """(case, settings changed, the setting the error must name) for ``s``'s mode."""
    rogue = {"ssl_ca_location": str(s.certs.rogue_ca)}
    cases: list[tuple[str, dict[str, str | None], str]] = [
        ("untrusted CA", rogue, "ssl.ca.location")]  # fmt: skip
    if s.mode == "mtls":
        for which in ("untrusted", "expired"):
            cert, key = s.certs.client(which)
            cases.append((f"{which} client certificate", {"ssl_certificate_location": str(cert),
                          "ssl_key_location": str(key)}, "ssl.certificate.location"))  # fmt: skip
        cases.append(("no client certificate", {"ssl_certificate_location": None,
                      "ssl_key_location": None}, "ssl.certificate.location"))  # fmt: skip
    if s.mode.startswith("scram"):
        cases.append(("wrong password", {"sasl_password": WRONG_PASSWORD}, "sasl.password"))
        cases.append(("unknown user", {"sasl_username": "ghost"}, "sasl.password"))
    if s.mode == "scram-sha-256":
        cases.append(("mechanism not offered", {"sasl_mechanism": "SCRAM-SHA-512"},
                      "sasl.mechanism"))  # fmt: skip
    if s.mode == "wrong-host":
        cases = [("bad hostname", {"ssl_endpoint_identification_algorithm": None},
                  "ssl.endpoint.identification.algorithm"),
                 ("bad hostname, https set", {"ssl_endpoint_identification_algorithm": "https"},
                  "ssl.endpoint.identification.algorithm")]  # fmt: skip
    return cases


#: every case runs `serve` (the writer); the first case of a mode runs these as well
FIRST_CASE_ALSO = (("watermark",), ("apply",), ("marker", "m1", "--timeout-s", "5"),
                   ("tail", "--no-follow"))  # fmt: skip


@pytest.mark.parametrize("secured", [*MODES, "wrong-host"], indirect=True)
def test_bad_credentials_fail_fast_naming_the_setting(secured, tmp_path, unique_name):
    t0 = time.monotonic()
    admin = secured.conf()
    before = log_end_offsets(admin)
    jobs: dict[str, tuple[Scene, tuple[str, ...]]] = {}
    cases = _bad_cases(secured)
    for i, (case, override, _setting) in enumerate(cases):
        scene = Scene(tmp_path / f"case{i}", admin["bootstrap.servers"], unique_name,
                      settings(secured.security, **override), VIA[secured.mode])  # fmt: skip
        for args in (("serve",), *(FIRST_CASE_ALSO if i == 0 else ())):
            jobs[f"{case}: {args[0]}"] = (scene, args)
    # two at a time: each verdict is timed as an operator's one command would be, not
    # behind a crowd of Python start-ups on a shared 2-core machine
    done = run_parallel(jobs, timeout_s=90, at_once=2)
    expected = {case: setting for case, _o, setting in cases}
    wrong = []
    for key, d in done.items():
        setting = expected[key.rsplit(": ", 1)[0]]
        errors = [ln for ln in d.stderr.splitlines() if ln.startswith("lowmark: error:")]
        if d.returncode == 0 or d.seconds >= VERDICT_S or len(errors) != 1 or setting not in (
            errors[0] if errors else ""
        ):  # fmt: skip
            wrong.append(f"{key}: exit {d.returncode} after {d.seconds:.1f} s, wanted one error "
                         f"naming {setting}; stderr: {d.stderr[-1500:]}")  # fmt: skip
        elif "Traceback" in d.stderr:
            wrong.append(f"{key}: a traceback: {d.stderr[-1500:]}")
    assert not wrong, "\n".join(wrong)
    after = log_end_offsets(admin)
    assert after == before, "a refused command wrote records"
    assert not [t for t in after if unique_name in t], "a refused command created topics"
    secrets = [*secrets_of(secured.security, secured.certs), WRONG_PASSWORD]
    _no_leaks({k: d.stdout + d.stderr for k, d in done.items()}, secrets)
    if secured.mode == "wrong-host":
        # the same brokers with the check off: it was the hostname, not the cluster
        scene = Scene(tmp_path / "check-off", admin["bootstrap.servers"], unique_name,
                      settings(secured.security, ssl_endpoint_identification_algorithm="none"),
                      "env")  # fmt: skip
        scene.run("topology", "--json").ok()
    slowest = max(d.seconds for d in done.values())
    print(f"{secured.mode}: slowest verdict {slowest:.1f} s;",
          {k: round(d.seconds, 1) for k, d in done.items()})  # fmt: skip
    record(f"security {secured.mode}: bad credentials", faults=len(cases), checked=len(done),
           violations=0, checked_what="refused commands: exit != 0 < 30 s naming the setting, "
           "no record, no secret", seconds=time.monotonic() - t0,
           slowest_verdict_s=round(slowest, 1), cases=[c for c, _o, _s in cases])  # fmt: skip


def test_the_matrix_covers_every_secured_mode():
    from connectors.embedded_kafka.security import MODES as ALL

    assert set(MODES) == set(ALL) - {"plaintext"}
