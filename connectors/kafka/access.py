"""Pre-flight of a secured connection: :func:`check_access`, before anything is produced.

librdkafka retries a refused handshake forever and reports it only as log lines, so a
service with a wrong password would sit "connecting" and a tool would time out with
"Broker transport failure". Every lowmark command runs this first on a TLS or SASL
connection (``pipeline.app.cli_services.build_config``) and fails within seconds, with a
:class:`~pipeline.errors.KafkaAuthError` naming the setting to fix:

1. the files: each of ssl.ca.location, ssl.certificate.location and ssl.key.location
   exists, is readable and parses; the client certificate is valid now (read from the
   file: an expired one is refused by the broker with only a TLS alert) and matches its key;
2. one metadata request under a deadline, its errors read as they arrive (``error_cb``);
3. a certificate the client could not verify is looked at again with Python's own TLS
   handshake, because librdkafka words a hostname mismatch exactly like an untrusted CA.

A broker that does not answer at all is not an access error: the caller's own retries and
timeouts handle an unreachable cluster as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connectors.kafka.config import KafkaConnection, where_set
from pipeline.errors import KafkaAuthError

#: well under the 30 s an operator waits for a verdict; a handshake takes ~0.5 s
DEFAULT_DEADLINE_S = 10.0
_AUTHENTICATION = -169  # librdkafka's _AUTHENTICATION
_SSL = -181  # _SSL
_TRANSPORT = -195  # _TRANSPORT

Clock = Callable[[], float]


@dataclass(frozen=True)
class Refusal:
    """What the brokers refused, and the setting that fixes it."""

    setting: str
    message: str


def check_access(
    connection: KafkaConnection,
    deadline_s: float = DEFAULT_DEADLINE_S,
    *,
    now: Clock = time.time,
) -> None:
    """Raise :class:`KafkaAuthError` if ``connection``'s TLS/SASL settings cannot work."""
    if connection.security_protocol == "PLAINTEXT":
        return
    check_files(connection, now=now)
    refusal = _probe(connection, deadline_s)
    if refusal is not None:
        raise KafkaAuthError(
            f"Kafka refused lowmark's connection to {connection.bootstrap_servers}: "
            f"{refusal.message}",
            setting=refusal.setting,
        )


# ---------------------------------------------------------------- files


def check_files(connection: KafkaConnection, *, now: Clock = time.time) -> None:
    """The TLS files exist, parse, match, and the client certificate is valid ``now``."""
    ca = connection.ssl_ca_location
    cert, key = connection.ssl_certificate_location, connection.ssl_key_location
    for setting, path in (("ssl.ca.location", ca), ("ssl.certificate.location", cert),
                          ("ssl.key.location", key)):  # fmt: skip
        if path:
            _readable(setting, path)
    if ca:
        try:
            ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise KafkaAuthError(
                f"ssl.ca.location {ca} holds no usable CA certificate ({exc}): set "
                f"{where_set('ssl.ca.location')} to the PEM file of the CA that signed the "
                "brokers' certificates",
                setting="ssl.ca.location",
            ) from None
    if cert and key:
        _check_validity(cert, now())
        password = connection.ssl_key_password
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                cert, key, password.get_secret_value() if password else None
            )
        except (ssl.SSLError, ValueError) as exc:
            raise KafkaAuthError(
                f"ssl.key.location {key} is not the key of ssl.certificate.location {cert}, "
                f"or cannot be read with ssl.key.password ({exc}): give the matching pair",
                setting="ssl.key.location",
            ) from None


def _readable(setting: str, path: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        what = "does not exist" if isinstance(exc, FileNotFoundError) else "cannot be read"
        raise KafkaAuthError(
            f"{setting} {path} {what} ({exc.strerror}): set {where_set(setting)} to a "
            "readable PEM file",
            setting=setting,
        ) from None


def _check_validity(cert: str, now_s: float) -> None:
    dates = _cert_dates(cert)
    if dates is None:
        return  # no openssl here: an expired certificate still fails, as a TLS alert
    not_before, not_after = dates
    if now_s > ssl.cert_time_to_seconds(not_after):
        raise KafkaAuthError(
            f"the client certificate ssl.certificate.location {cert} expired on "
            f"{not_after}: the brokers refuse it. Renew it (and its key, "
            "ssl.key.location) and restart",
            setting="ssl.certificate.location",
        )
    if now_s < ssl.cert_time_to_seconds(not_before):
        raise KafkaAuthError(
            f"the client certificate ssl.certificate.location {cert} is not valid before "
            f"{not_before} (is this host's clock right?)",
            setting="ssl.certificate.location",
        )


def _cert_dates(cert: str) -> tuple[str, str] | None:
    """(notBefore, notAfter) of the first certificate in ``cert``, as openssl prints them.

    The standard library parses a certificate only inside a handshake, and lowmark does
    not depend on ``cryptography``; ``openssl x509`` is on every host that has TLS files.
    None when openssl is not installed.
    """
    exe = shutil.which("openssl")
    if exe is None:
        return None
    done = subprocess.run(
        [exe, "x509", "-noout", "-startdate", "-enddate", "-in", cert],
        capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"},
    )  # fmt: skip
    found = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("not")
    )
    try:
        dates = found["notBefore"], found["notAfter"]
        for text in dates:
            ssl.cert_time_to_seconds(text)
    except (KeyError, ValueError):
        why = done.stderr.strip().splitlines()[-1:] or [f"openssl printed {done.stdout!r}"]
        raise KafkaAuthError(
            f"ssl.certificate.location {cert} is not a PEM certificate ({why[0]}): set "
            f"{where_set('ssl.certificate.location')} to the client certificate's PEM file",
            setting="ssl.certificate.location",
        ) from None
    return dates


# ---------------------------------------------------------------- the brokers' verdict


def explain(code: int, text: str, connection: KafkaConnection) -> Refusal | None:
    """The refusal librdkafka's error ``code``/``text`` means, or None if it is not one.

    Pure: unit-tested against the errors librdkafka 2.x reports for each bad case.
    """
    low = text.lower()
    if code == _AUTHENTICATION:
        mech = connection.sasl_mechanism
        if "unsupported sasl mechanism" in low:
            offered = text.rsplit("mechanisms:", 1)[-1].split("(")[0].strip()
            return Refusal(
                "sasl.mechanism",
                f"the brokers do not offer SASL {mech} (they offer: {offered or 'none'}); "
                f"set {where_set('sasl.mechanism')}",
            )
        return Refusal(
            "sasl.password",
            f"SASL {mech} authentication of sasl.username {connection.sasl_username!r} "
            "failed: the brokers know no such user or the password is wrong (SCRAM does "
            f"not say which). Check {where_set('sasl.username')} and "
            f"{where_set('sasl.password')}",
        )
    if code == _SSL and "certificate verify failed" in low:
        return Refusal(
            "ssl.ca.location",
            f"the brokers' TLS certificate could not be verified against ssl.ca.location "
            f"({connection.ssl_ca_location or 'the system CAs'}); set "
            f"{where_set('ssl.ca.location')} to the CA that signed them",
        )
    if code in (_SSL, _TRANSPORT) and "ssl/tls alert" in low:
        cert = connection.ssl_certificate_location
        given = f"the client certificate {cert}" if cert else "no client certificate (none set)"
        return Refusal(
            "ssl.certificate.location",
            f"the brokers refused {given} in the TLS handshake ({_alert(text)}): they "
            "require one signed by a CA they trust, valid now. Set "
            f"{where_set('ssl.certificate.location')} and {where_set('ssl.key.location')}",
        )
    if code in (_SSL, _TRANSPORT) and (
        "security.protocol" in low or "ssl connection closed by peer" in low
        or "wrong version number" in low or "packet length too long" in low
    ):  # fmt: skip
        return Refusal(
            "security.protocol",
            f"the listener does not speak {connection.security_protocol} ({_short(text)}); "
            f"set {where_set('security.protocol')} to what the listener is (PLAINTEXT, "
            "SSL, SASL_PLAINTEXT, SASL_SSL)",
        )
    return None


def _alert(text: str) -> str:
    cut = text.lower().find("ssl/tls alert")
    return text[cut:].split(":")[0] if cut >= 0 else _short(text)


def _short(text: str) -> str:
    # "sasl_ssl://host:port/bootstrap: <what> (after 5ms in state UP)" -> "<what>"
    body = text.split("/bootstrap: ", 1)[-1]
    return body.split(" (after ", 1)[0]


def _probe(connection: KafkaConnection, deadline_s: float) -> Refusal | None:
    from confluent_kafka.admin import AdminClient

    errors: list[tuple[int, str]] = []
    quiet = logging.getLogger("lowmark.kafka.access.librdkafka")
    quiet.setLevel(logging.CRITICAL)  # every refusal is also logged; we report it once
    conf: dict[str, Any] = {
        **connection.with_client_id(f"{connection.client_id}-access-check").librdkafka(),
        "logger": quiet,
        "error_cb": lambda err: errors.append((err.code(), err.str())),
        "socket.connection.setup.timeout.ms": int(max(1.0, min(deadline_s, 10.0)) * 1000),
    }
    admin = AdminClient(conf)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            admin.list_topics(timeout=min(0.5, max(0.05, deadline - time.monotonic())))
            return None  # metadata answered: every handshake on the way succeeded
        except Exception:  # librdkafka's KafkaException; the error_cb tells the cause
            admin.poll(0)
        for code, text in errors:
            refusal = explain(code, text, connection)
            if refusal is not None:
                if refusal.setting == "ssl.ca.location":
                    return _tls_verdict(connection) or refusal
                return refusal
        if time.monotonic() >= deadline:
            return None  # not refused, just not answered: the caller's timeouts decide


# ---------------------------------------------------------------- CA or hostname


def _tls_verdict(connection: KafkaConnection, timeout_s: float = 5.0) -> Refusal | None:
    """Why the broker's certificate failed to verify, by a handshake of our own.

    OpenSSL (and so librdkafka) reports a hostname mismatch as "certificate verify failed"
    and blames ssl.ca.location; the verify message tells the two apart.
    """
    host, _, port = connection.bootstrap_servers.split(",")[0].strip().rpartition(":")
    host = host.strip("[]")
    try:
        ctx = ssl.create_default_context(cafile=connection.ssl_ca_location)
        ctx.check_hostname = connection.ssl_endpoint_identification_algorithm != "none"
        with (
            socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        reason = str(exc.verify_message or exc)
    except (OSError, ValueError):
        return None  # could not look: librdkafka's reading stands
    if "hostname mismatch" in reason.lower() or "ip address mismatch" in reason.lower():
        return Refusal(
            "ssl.endpoint.identification.algorithm",
            f"the broker's TLS certificate at {host}:{port} is signed by a trusted CA but "
            f"does not name {host!r} ({reason.rstrip('.')}). Reach the brokers by a name "
            "their certificates list (bootstrap.servers, the brokers' advertised.listeners) "
            "or reissue the certificates with it in subjectAltName; "
            f"{where_set('ssl.endpoint.identification.algorithm')} = none turns the check "
            "off (test clusters only)",
        )
    ca = connection.ssl_ca_location or "the system CAs"
    return Refusal(
        "ssl.ca.location",
        f"the broker's TLS certificate at {host}:{port} is not signed by a CA in "
        f"ssl.ca.location ({ca}): {reason}. Set {where_set('ssl.ca.location')} to the CA "
        "that signed the brokers' certificates",
    )
