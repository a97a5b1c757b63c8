"""ClusterSecurity and make_certs without a broker: what the brokers and clients are given.

Tries to break: a SCRAM password reaching an error message through the storage-format
command line; a mode whose broker listener or client settings do not match (a client
told SSL while the listener speaks SASL_SSL); certificates that do not say what their
names promise (the expired one still valid, the untrusted one signed by our CA, the
wrong-host one naming 127.0.0.1).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from connectors.embedded_kafka.security import (
    BROKER_USER,
    CLIENT_USER,
    MODES,
    Certs,
    ClusterSecurity,
    make_certs,
    redact_args,
)
from pipeline.errors import SetupError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: apt-get install openssl (make deps does)")
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_redact_args_hides_every_scram_password_and_keeps_the_rest():
    sec = ClusterSecurity("scram-sha-512", Certs(Path("/nowhere")),
                          users={CLIENT_USER: "client-Pw9"})  # fmt: skip
    cmd = ["java", "format", "-c", "server.properties", *sec.format_args()]
    shown = " ".join(redact_args(cmd))
    assert "client-Pw9" not in shown and sec.broker_password not in shown
    assert shown.count("SCRAM-SHA-512=[redacted]") == 2
    assert shown.startswith("java format -c server.properties --add-scram")
    assert redact_args(["--add-scram"]) == ["--add-scram"]  # nothing after it: nothing to hide
    assert redact_args(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("mode", MODES)
def test_listener_and_client_agree_on_the_protocol(certs, mode):
    sec = ClusterSecurity(mode, certs if mode != "plaintext" else None,
                          users={CLIENT_USER: "pw"})  # fmt: skip
    props = sec.broker_props(9093, 9094)
    client = sec.client_conf()
    if mode == "plaintext":
        assert props == {} and client == {} and sec.format_args() == []
        return
    assert props["listener.security.protocol.map"].startswith(
        f"CLIENT:{client['security.protocol']},"
    )
    assert (props.get("ssl.client.auth") == "required") == (mode == "mtls")
    assert ("ssl.certificate.location" in client) == (mode == "mtls")
    if mode.startswith("scram"):
        assert client["sasl.mechanism"] == mode.upper() == props["sasl.enabled.mechanisms"]
        assert client["sasl.password"] == "pw"
        assert sec.client_conf(BROKER_USER)["sasl.password"] == sec.broker_password
        assert len(sec.format_args()) == 4
    else:
        assert sec.format_args() == [] and "sasl.mechanism" not in client


def test_a_mode_that_does_not_exist_or_lacks_certificates_is_refused(certs):
    with pytest.raises(SetupError, match="not one of"):
        ClusterSecurity("kerberos", certs)
    with pytest.raises(SetupError, match="make_certs"):
        ClusterSecurity("tls")


def _verify(ca, cert) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_the_certificates_are_what_their_names_say(certs):
    assert _verify(certs.ca, certs.path("broker.pem")).returncode == 0
    assert _verify(certs.ca, certs.client()[0]).returncode == 0
    expired = _verify(certs.ca, certs.client("expired")[0])
    assert expired.returncode != 0 and "expired" in expired.stdout + expired.stderr
    assert _verify(certs.ca, certs.client("untrusted")[0]).returncode != 0
    assert _verify(certs.rogue_ca, certs.client("untrusted")[0]).returncode == 0
    wrong = str(certs.path("wronghost.pem"))
    names = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", wrong],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "wrong.invalid" in names and "127.0.0.1" not in names
    # key and certificate of one identity, as a PEM keystore holds them
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certs.broker_keystore)
    for store in (certs.broker_keystore, certs.wrong_host_keystore):
        assert store.stat().st_mode & 0o077 == 0, f"{store} is readable by others"
