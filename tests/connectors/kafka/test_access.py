"""The access pre-flight without a broker: the TLS file checks and librdkafka's verdicts.

Tries to break: a missing, unreadable or garbage credential file passing as usable; an
expired or not-yet-valid client certificate or a key of another certificate reaching the
brokers (where they fail with a bare TLS alert); a refusal blamed on the wrong setting
(a hostname mismatch called an untrusted CA, a wrong password called a transport error);
a password or key leaking into a message. The error texts are the ones librdkafka 2.x
reported against the embedded Kafka 4 brokers (tests/system/test_security.py drives them
for real).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.embedded_kafka.security import Certs, make_certs
from connectors.kafka.access import _tls_verdict as tls_verdict
from connectors.kafka.access import check_access, check_files, explain
from connectors.kafka.config import KafkaConnection
from pipeline.errors import KafkaAuthError, KafkaError, LowmarkError

PASSWORD = "pw-Zq81xT0k"
_WRONG_PW = (
    "sasl_ssl://127.0.0.1:30698/bootstrap: SASL authentication error: Authentication failed "
    "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256 "
    "(after 334ms in state AUTH_REQ)"
)
_MECH = (
    "sasl_ssl://127.0.0.1:30698/bootstrap: SASL SCRAM-SHA-512 mechanism handshake failed: "
    "Broker: Unsupported SASL mechanism: broker's supported mechanisms: SCRAM-SHA-256 "
    "(after 323ms in state AUTH_HANDSHAKE)"
)
_VERIFY = (
    "ssl://127.0.0.1:30739/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
    "certificate verify failed: broker certificate could not be verified, verify that "
    "ssl.ca.location is correctly configured or root CA certificates are installed (install "
    "ca-certificates package) (after 13ms in state SSL_HANDSHAKE)"
)
_BAD_CERT = (
    "ssl://127.0.0.1:30739/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls "
    "alert bad certificate: SSL alert number 42 (after 9ms in state APIVERSION_QUERY)"
)
_WRONG_PROTOCOL = (
    "ssl://127.0.0.1:9092/bootstrap: SSL handshake failed: error:0A00010B:SSL routines::"
    "wrong version number (after 2ms in state SSL_HANDSHAKE)"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: apt-get install openssl (make deps does)")
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certs, which: str | None = "client", **kw: object) -> KafkaConnection:
    files: dict[str, object] = {"ssl_ca_location": str(certs.ca)}
    if which:
        cert, key = certs.client(which)
        files.update(ssl_certificate_location=str(cert), ssl_key_location=str(key))
    return KafkaConnection("127.0.0.1:9093", security_protocol="SSL", **{**files, **kw})  # type: ignore[arg-type]


def _scram(mech: str = "SCRAM-SHA-256") -> KafkaConnection:
    return KafkaConnection(
        "127.0.0.1:9093", security_protocol="SASL_SSL", sasl_mechanism=mech,
        sasl_username="lowmark", sasl_password=PASSWORD,
    )  # fmt: skip


# ---------------------------------------------------------------- the files


def test_good_files_pass(certs):
    check_files(_tls(certs))
    check_files(_tls(certs, which=None))


@pytest.mark.parametrize("setting", ["ssl_ca_location", "ssl_certificate_location",
                                     "ssl_key_location"])  # fmt: skip
def test_a_missing_file_names_its_setting_and_how_to_set_it(certs, tmp_path, setting):
    gone = str(tmp_path / "gone.pem")
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, **{setting: gone}))
    dotted = setting.replace("_", ".")
    assert info.value.setting == dotted
    msg = str(info.value)
    assert gone in msg and "does not exist" in msg
    assert f"LOWMARK_KAFKA_{setting.upper()}" in msg and f"{setting} in the [kafka] table" in msg


def test_an_unreadable_file_is_told_from_a_missing_one(certs, tmp_path):
    # the tests run as root, where a mode of 000 still reads: a directory cannot be read
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, ssl_ca_location=str(tmp_path)))
    assert info.value.setting == "ssl.ca.location"
    assert "cannot be read" in str(info.value)


def test_a_ca_file_without_a_certificate_is_refused(certs, tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, ssl_ca_location=str(junk)))
    assert info.value.setting == "ssl.ca.location"
    assert "no usable CA certificate" in str(info.value)


def test_a_client_certificate_that_is_not_pem_is_refused(certs, tmp_path):
    junk = tmp_path / "client.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, ssl_certificate_location=str(junk)))
    assert info.value.setting == "ssl.certificate.location"
    assert "not a PEM certificate" in str(info.value)


def test_an_expired_client_certificate_is_refused_before_the_brokers_see_it(certs):
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, which="expired"))
    assert info.value.setting == "ssl.certificate.location"
    msg = str(info.value)
    assert "expired on" in msg and "2020" in msg and str(certs.client("expired")[0]) in msg


def test_validity_is_read_against_the_clock_given(certs):
    # make_certs' good client certificate: 30 days from now
    check_files(_tls(certs), now=lambda: time.time() + 29 * 86400)
    with pytest.raises(KafkaAuthError, match="expired on"):
        check_files(_tls(certs), now=lambda: time.time() + 31 * 86400)
    with pytest.raises(KafkaAuthError, match="not valid before") as info:
        check_files(_tls(certs), now=lambda: time.time() - 86400)
    assert info.value.setting == "ssl.certificate.location"
    assert "clock" in str(info.value)


def test_a_key_of_another_certificate_is_refused(certs):
    _, other_key = certs.client("untrusted")
    with pytest.raises(KafkaAuthError) as info:
        check_files(_tls(certs, ssl_key_location=str(other_key)))
    assert info.value.setting == "ssl.key.location"
    msg = str(info.value)
    assert "is not the key of" in msg and str(other_key) in msg


def test_no_key_material_appears_in_a_refusal(certs):
    _, key = certs.client("client")
    body = [line for line in key.read_text().splitlines() if not line.startswith("-----")]
    _, other_key = certs.client("untrusted")
    for conn in (_tls(certs, ssl_key_location=str(other_key)), _tls(certs, which="expired")):
        with pytest.raises(KafkaAuthError) as info:
            check_files(conn)
        assert not any(chunk in str(info.value) for chunk in body)
        assert "PRIVATE KEY" not in str(info.value)


def test_auth_errors_are_lowmark_kafka_errors_that_no_retry_cures():
    err = KafkaAuthError("refused", setting="sasl.password")
    assert isinstance(err, KafkaError) and isinstance(err, LowmarkError)
    assert err.retriable is False and err.setting == "sasl.password"


def test_plaintext_is_not_probed():
    # port 1 answers nothing: a probe would wait out its deadline
    started = time.monotonic()
    check_access(KafkaConnection("127.0.0.1:1"), deadline_s=5)
    assert time.monotonic() - started < 0.5


def test_an_unreachable_broker_is_not_an_access_error(certs):
    # refused connections are the caller's retries' business, not a credential to fix
    started = time.monotonic()
    conn = KafkaConnection("127.0.0.1:1", security_protocol="SSL", ssl_ca_location=str(certs.ca))
    check_access(conn, deadline_s=1.5)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- librdkafka's verdicts


def test_a_refused_password_blames_username_and_password_and_shows_neither_secret():
    refusal = explain(-169, _WRONG_PW, _scram())
    assert refusal is not None and refusal.setting == "sasl.password"
    assert "'lowmark'" in refusal.message and "SCRAM-SHA-256" in refusal.message
    assert "LOWMARK_KAFKA_SASL_PASSWORD" in refusal.message
    assert "LOWMARK_KAFKA_SASL_USERNAME" in refusal.message
    assert PASSWORD not in refusal.message


def test_an_unoffered_mechanism_names_sasl_mechanism_and_what_is_offered():
    refusal = explain(-169, _MECH, _scram("SCRAM-SHA-512"))
    assert refusal is not None and refusal.setting == "sasl.mechanism"
    assert "SCRAM-SHA-512" in refusal.message and "they offer: SCRAM-SHA-256" in refusal.message


def test_an_unverified_broker_certificate_blames_the_ca(certs):
    refusal = explain(-181, _VERIFY, _tls(certs))
    assert refusal is not None and refusal.setting == "ssl.ca.location"
    assert str(certs.ca) in refusal.message


@pytest.mark.parametrize("code", [-195, -181])
def test_a_tls_alert_blames_the_client_certificate(certs, code):
    refusal = explain(code, _BAD_CERT, _tls(certs))
    assert refusal is not None and refusal.setting == "ssl.certificate.location"
    assert "alert bad certificate" in refusal.message
    assert str(certs.client()[0]) in refusal.message
    bare = explain(code, _BAD_CERT, _tls(certs, which=None))
    assert bare is not None and "no client certificate (none set)" in bare.message


def test_a_listener_speaking_another_protocol_blames_security_protocol(certs):
    refusal = explain(-181, _WRONG_PROTOCOL, _tls(certs))
    assert refusal is not None and refusal.setting == "security.protocol"
    assert "wrong version number" in refusal.message
    assert "after 2ms" not in refusal.message


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (
            -195,
            "ssl://127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection "
            "refused (after 0ms in state CONNECT)",
        ),
        (-187, "1/1 brokers are down"),
        (-169, ""),  # an authentication code is a refusal whatever its text
    ],
)
def test_what_is_not_a_refusal_stays_none(certs, code, text):
    refusal = explain(code, text, _scram())
    assert (refusal is not None) == (code == -169)


# ---------------------------------------------------------------- CA or hostname


class _TlsServer:
    """A TLS listener on loopback presenting ``keystore``; handshakes and hangs up."""

    def __init__(self, keystore: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(keystore)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused us: that is the case under test

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def tls_server(request, certs) -> Iterator[_TlsServer]:
    server = _TlsServer(getattr(certs, request.param))
    yield server
    server.close()


@pytest.mark.parametrize("tls_server", ["wrong_host_keystore"], indirect=True)
def test_a_hostname_mismatch_is_told_from_an_untrusted_ca(certs, tls_server):
    conn = KafkaConnection(f"127.0.0.1:{tls_server.port}", security_protocol="SSL",
                           ssl_ca_location=str(certs.ca))  # fmt: skip
    refusal = tls_verdict(conn)
    assert refusal is not None and refusal.setting == "ssl.endpoint.identification.algorithm"
    assert "does not name '127.0.0.1'" in refusal.message
    off = KafkaConnection(conn.bootstrap_servers, security_protocol="SSL",
                          ssl_ca_location=str(certs.ca),
                          ssl_endpoint_identification_algorithm="none")  # fmt: skip
    assert tls_verdict(off) is None


@pytest.mark.parametrize("tls_server", ["broker_keystore"], indirect=True)
def test_an_untrusted_ca_is_blamed_on_ssl_ca_location(certs, tls_server):
    conn = KafkaConnection(f"127.0.0.1:{tls_server.port}", security_protocol="SSL",
                           ssl_ca_location=str(certs.rogue_ca))  # fmt: skip
    refusal = tls_verdict(conn)
    assert refusal is not None and refusal.setting == "ssl.ca.location"
    assert str(certs.rogue_ca) in refusal.message
    trusted = KafkaConnection(conn.bootstrap_servers, security_protocol="SSL",
                              ssl_ca_location=str(certs.ca))  # fmt: skip
    assert tls_verdict(trusted) is None
