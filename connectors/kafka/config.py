"""How lowmark reaches Kafka: one frozen, validated :class:`KafkaConnection`.

Every producer, consumer and admin client is built from ``connection.librdkafka()`` plus
its own role-specific settings, so TLS/SASL is configured once. Where the bootstrap
servers come from (:func:`resolve`), first match wins:

1. an explicit value (``--bootstrap-servers``, a config file),
2. ``LOWMARK_BOOTSTRAP_SERVERS``,
3. the embedded cluster started by ``lowmark kafka up`` (its ``cluster.json``).

Security settings come from ``LOWMARK_KAFKA_*`` variables (see :func:`from_env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pipeline.errors import ConfigError

BOOTSTRAP_ENV = "LOWMARK_BOOTSTRAP_SERVERS"
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
_NEEDS_PASSWORD = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class Secret:
    """A string that does not show itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class KafkaConnection:
    """Bootstrap servers plus the TLS/SASL settings every lowmark client shares."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: Secret | None = None
    #: "https" (librdkafka's default: the broker's certificate must name the host dialled)
    #: or "none" (no hostname check: a test cluster, never production)
    ssl_endpoint_identification_algorithm: str | None = None
    client_id: str = "lowmark"
    #: further librdkafka settings, passed through as they are
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept plain strings for secrets and normalise case, then freeze `extra`.
        for name in ("sasl_password", "ssl_key_password"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Secret(value))
        object.__setattr__(self, "security_protocol", self.security_protocol.upper())
        if self.sasl_mechanism:
            object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        self._validate()

    def _validate(self) -> None:
        servers = [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]
        if not servers:
            raise ConfigError(
                "bootstrap.servers is empty: give host:port[,host:port...] "
                f"(or set {BOOTSTRAP_ENV})"
            )
        for server in servers:
            match = _HOST_PORT.match(server)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ConfigError(
                    f"bootstrap server {server!r} is not host:port (e.g. 127.0.0.1:9092)"
                )
        if self.security_protocol not in PROTOCOLS:
            raise ConfigError(
                f"security.protocol {self.security_protocol!r} is not one of {PROTOCOLS}"
            )
        sasl = self.security_protocol.startswith("SASL_")
        ssl = self.security_protocol.endswith("SSL")
        if sasl:
            self._validate_sasl()
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ConfigError(
                f"SASL settings are given but security.protocol is {self.security_protocol}; "
                "they would be ignored. Use SASL_SSL (or SASL_PLAINTEXT) or drop them."
            )
        tls_files = (self.ssl_ca_location, self.ssl_certificate_location, self.ssl_key_location)
        if not ssl and any(tls_files):
            raise ConfigError(
                f"TLS files are given but security.protocol is {self.security_protocol}; "
                "they would be ignored. Use SSL (or SASL_SSL) or drop them."
            )
        endpoint = self.ssl_endpoint_identification_algorithm
        if endpoint is not None and endpoint not in ("https", "none"):
            raise ConfigError(
                f"ssl.endpoint.identification.algorithm {endpoint!r} is not 'https' (check "
                "that the broker certificate names the host) or 'none' (do not check)"
            )
        if endpoint is not None and not ssl:
            raise ConfigError(
                f"ssl.endpoint.identification.algorithm is given but security.protocol is "
                f"{self.security_protocol}; it would be ignored. Use SSL or SASL_SSL or drop it."
            )
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ConfigError(
                "a TLS client certificate needs both ssl.certificate.location and "
                "ssl.key.location; one of them is missing"
            )
        clash = set(self.extra) & set(self._typed())
        if clash:
            raise ConfigError(
                f"extra librdkafka settings {sorted(clash)} redefine typed connection "
                "fields; set those through the fields (or LOWMARK_KAFKA_* variables) instead"
            )

    def _validate_sasl(self) -> None:
        if not self.sasl_mechanism:
            raise ConfigError(
                f"security.protocol {self.security_protocol} needs a SASL mechanism: set "
                f"sasl_mechanism (LOWMARK_KAFKA_SASL_MECHANISM) to one of {SASL_MECHANISMS}"
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"SASL mechanism {self.sasl_mechanism!r} is not one of {SASL_MECHANISMS}"
            )
        if self.sasl_mechanism in _NEEDS_PASSWORD and not (
            self.sasl_username and self.sasl_password
        ):
            raise ConfigError(
                f"SASL {self.sasl_mechanism} needs a username and a password: set "
                "LOWMARK_KAFKA_SASL_USERNAME and LOWMARK_KAFKA_SASL_PASSWORD"
            )

    def _typed(self) -> dict[str, str]:
        conf = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password
            else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value()
            if self.ssl_key_password else None,
            "ssl.endpoint.identification.algorithm": self.ssl_endpoint_identification_algorithm,
        }
        conf.update({k: v for k, v in optional.items() if v})
        return conf

    def librdkafka(self) -> dict[str, str]:
        """The settings every client shares, as a fresh dict to extend per role."""
        return {**self._typed(), **self.extra}

    def with_client_id(self, client_id: str) -> KafkaConnection:
        """A copy naming a different client (so broker logs tell components apart)."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return KafkaConnection(**{**fields, "client_id": client_id})


#: what ``from_env`` reads after ``LOWMARK_KAFKA_`` (and a [kafka] table's keys, lower case)
ENV_KEYS = (
    "SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD", "SSL_CA_LOCATION",
    "SSL_CERTIFICATE_LOCATION", "SSL_KEY_LOCATION", "SSL_KEY_PASSWORD",
    "SSL_ENDPOINT_IDENTIFICATION_ALGORITHM", "CLIENT_ID", "EXTRA",
)  # fmt: skip


def cluster_tried(conf: Mapping[str, Any]) -> str:
    """The cluster a client reaches, as an operator would check it (no secrets)."""
    return (f"bootstrap.servers={conf.get('bootstrap.servers', '')} "
            f"security.protocol={conf.get('security.protocol', 'plaintext')}")  # fmt: skip


def where_set(setting: str) -> str:
    """How an operator sets librdkafka's ``setting`` for lowmark, for error messages."""
    key = setting.replace(".", "_")
    return f"{setting} (LOWMARK_KAFKA_{key.upper()}, or {key} in the [kafka] table)"


def _parse_extra(text: str, var: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"{var}: {item!r} is not key=value (e.g. socket.keepalive.enable=true)"
            )
        out[key.strip()] = value.strip()
    return out


def from_env(
    prefix: str = "LOWMARK_KAFKA_",
    *,
    bootstrap_servers: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> KafkaConnection:
    """A connection from the environment.

    Bootstrap: the argument, else ``LOWMARK_BOOTSTRAP_SERVERS``. The rest from
    ``<prefix>SECURITY_PROTOCOL``, ``SASL_MECHANISM``, ``SASL_USERNAME``, ``SASL_PASSWORD``,
    ``SSL_CA_LOCATION``, ``SSL_CERTIFICATE_LOCATION``, ``SSL_KEY_LOCATION``,
    ``SSL_KEY_PASSWORD``, ``SSL_ENDPOINT_IDENTIFICATION_ALGORITHM``, ``CLIENT_ID`` and
    ``EXTRA`` (``key=value,key=value``).
    """
    env = os.environ if environ is None else environ
    bootstrap = bootstrap_servers or env.get(BOOTSTRAP_ENV, "")
    if not bootstrap.strip():
        raise ConfigError(
            f"no Kafka bootstrap servers: set {BOOTSTRAP_ENV} (host:port,...) or run "
            "`lowmark kafka up`"
        )

    def get(name: str) -> str | None:
        value = env.get(prefix + name, "").strip()
        return value or None

    return KafkaConnection(
        bootstrap_servers=bootstrap.strip(),
        security_protocol=get("SECURITY_PROTOCOL") or "PLAINTEXT",
        sasl_mechanism=get("SASL_MECHANISM"),
        sasl_username=get("SASL_USERNAME"),
        sasl_password=Secret(p) if (p := get("SASL_PASSWORD")) else None,
        ssl_ca_location=get("SSL_CA_LOCATION"),
        ssl_certificate_location=get("SSL_CERTIFICATE_LOCATION"),
        ssl_key_location=get("SSL_KEY_LOCATION"),
        ssl_key_password=Secret(p) if (p := get("SSL_KEY_PASSWORD")) else None,
        ssl_endpoint_identification_algorithm=(
            e.lower() if (e := get("SSL_ENDPOINT_IDENTIFICATION_ALGORITHM")) else None
        ),
        client_id=get("CLIENT_ID") or "lowmark",
        extra=_parse_extra(get("EXTRA") or "", prefix + "EXTRA"),
    )


def resolve(
    bootstrap: str | None = None,
    *,
    name: str = "default",
    environ: Mapping[str, str] | None = None,
    embedded: Callable[[str], str | None] | None = None,
) -> KafkaConnection:
    """The connection to use: explicit > ``LOWMARK_BOOTSTRAP_SERVERS`` > embedded cluster.

    ``embedded`` looks up the running embedded cluster ``name``: the CLI and the demo pass
    the development launcher's ``find_bootstrap``; without it there is no embedded fallback
    (production code does not depend on the launcher).
    """
    env = os.environ if environ is None else environ
    chosen = (bootstrap or "").strip() or env.get(BOOTSTRAP_ENV, "").strip()
    if not chosen and embedded is not None:
        chosen = embedded(name) or ""
    if not chosen:
        raise ConfigError(
            f"no Kafka: run `lowmark kafka up` or set {BOOTSTRAP_ENV}=host:port[,host:port]"
        )
    return from_env(bootstrap_servers=chosen, environ=env)
