"""TLS, mutual TLS and SASL/SCRAM for an embedded cluster: :class:`ClusterSecurity`.

A secured cluster has one client listener, ``CLIENT``, which the brokers also use between
themselves (so a transaction's markers travel the same secured path a client does); only
the controller quorum stays on plaintext loopback. The brokers read PEM files directly
(``ssl.keystore.type=PEM``), so no keytool or JKS is needed, and SCRAM users are created
when the storage is formatted (``kafka-storage format --add-scram``), before any broker
runs.

:func:`make_certs` writes everything a test of the security matrix needs with ``openssl``:
a CA, a broker certificate for 127.0.0.1/localhost, a client certificate for mutual TLS,
and the bad ones: an expired client certificate, a client certificate from a CA the brokers
do not trust, and a broker certificate whose names match no address a client dials.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SetupError

MODES = ("plaintext", "tls", "mtls", "scram-sha-256", "scram-sha-512")
LISTENER = "CLIENT"
#: the user the brokers authenticate as to each other under SCRAM
BROKER_USER = "broker"
CLIENT_USER = "lowmark"
_CURVE = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
_GOOD_NAMES = "IP:127.0.0.1,DNS:localhost"
_CA_CONF = """\
[ca]
default_ca = lowmark
[lowmark]
database = {db}/index.txt
new_certs_dir = {db}
serial = {db}/serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[any]
commonName = supplied
[leaf]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = {usage}
{names}
"""


@dataclass(frozen=True)
class Certs:
    """The PEM files :func:`make_certs` wrote (keys unencrypted, PKCS#8), by role."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def broker_keystore(self) -> Path:
        """The broker's key and certificate in one file, as a PEM keystore wants them."""
        return self.dir / "broker.keystore.pem"

    @property
    def wrong_host_keystore(self) -> Path:
        """A broker identity the CA signed for ``wrong.invalid`` only."""
        return self.dir / "wronghost.keystore.pem"

    def client(self, which: str = "client") -> tuple[Path, Path]:
        """(certificate, key) of ``client``, ``expired`` or ``untrusted``."""
        return self.dir / f"{which}.pem", self.dir / f"{which}.key"

    @property
    def rogue_ca(self) -> Path:
        """The CA that signed ``untrusted``: valid, but no broker trusts it."""
        return self.dir / "rogue-ca.pem"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise SetupError("openssl is not installed: apt-get install openssl")
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SetupError(f"openssl {args[0]} failed (exit {done.returncode}): {done.stderr[-800:]}")


def _ca(dir_: Path, name: str) -> None:
    _openssl("req", "-x509", *_CURVE, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "30", "-subj", f"/CN=lowmark test {name}", cwd=dir_)  # fmt: skip


def _leaf(
    dir_: Path, ca: str, name: str, *, usage: str, names: str = "",
    start: str | None = None, end: str | None = None,
) -> None:  # fmt: skip
    """A key and a certificate ``name`` signed by ``ca`` (dates as openssl's YYMMDDHHMMSSZ)."""
    db = dir_ / f"{ca}.db"
    db.mkdir(exist_ok=True)
    (db / "index.txt").touch()
    if not (db / "serial").exists():
        (db / "serial").write_text(secrets.token_hex(8) + "\n")
    conf = dir_ / f"{name}.cnf"
    conf.write_text(
        _CA_CONF.format(db=db, usage=usage, names=f"subjectAltName = {names}" if names else "")
    )
    _openssl("req", "-new", *_CURVE, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=lowmark test {name}", cwd=dir_)  # fmt: skip
    dates = ["-startdate", start, "-enddate", end] if start and end else ["-days", "30"]
    _openssl("ca", "-batch", "-config", str(conf), "-extensions", "leaf", "-cert", f"{ca}.pem",
             "-keyfile", f"{ca}.key", "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext",
             *dates, cwd=dir_)  # fmt: skip


def make_certs(dir_: Path | str) -> Certs:
    """Write the CA, the broker identities and the client certificates into ``dir_``."""
    root = Path(dir_)
    root.mkdir(parents=True, exist_ok=True)
    _ca(root, "ca")
    _ca(root, "rogue-ca")
    both = "serverAuth,clientAuth"  # a broker is its own peers' client
    _leaf(root, "ca", "broker", usage=both, names=_GOOD_NAMES)
    _leaf(root, "ca", "wronghost", usage=both, names="DNS:wrong.invalid")
    _leaf(root, "ca", "client", usage="clientAuth")
    _leaf(root, "ca", "expired", usage="clientAuth",
          start="200101000000Z", end="200102000000Z")  # fmt: skip
    _leaf(root, "rogue-ca", "untrusted", usage="clientAuth")
    for name in ("broker", "wronghost"):
        key = (root / f"{name}.key").read_text()
        cert = (root / f"{name}.pem").read_text()
        store = root / f"{name}.keystore.pem"
        store.write_text(key + cert)
        store.chmod(0o600)
    for key_file in root.glob("*.key"):
        key_file.chmod(0o600)
    return Certs(root)


@dataclass(frozen=True)
class ClusterSecurity:
    """How an embedded cluster's client listener is secured, and how a client gets in.

    ``mode`` is one of :data:`MODES`; every mode but ``plaintext`` needs ``certs`` (the
    brokers always speak TLS then; SCRAM runs over it as SASL_SSL). ``wrong_host`` makes the
    brokers present the certificate for ``wrong.invalid`` (the bad-hostname case).
    ``users``: SCRAM users and their passwords; the broker's own user is added.
    """

    mode: str = "plaintext"
    certs: Certs | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    wrong_host: bool = False
    broker_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SetupError(f"security mode {self.mode!r} is not one of {MODES}")
        if self.mode != "plaintext" and self.certs is None:
            raise SetupError(f"security mode {self.mode} needs certificates: make_certs(dir)")

    @property
    def scram(self) -> str | None:
        """``SCRAM-SHA-256`` / ``SCRAM-SHA-512`` in a SCRAM mode, else None."""
        return self.mode.upper() if self.mode.startswith("scram") else None

    @property
    def protocol(self) -> str:
        """The client listener's ``security.protocol``."""
        if self.mode == "plaintext":
            return "PLAINTEXT"
        return "SASL_SSL" if self.scram else "SSL"

    def broker_props(self, port: int, controller_port: int) -> dict[str, str]:
        """``server.properties`` entries over the plaintext defaults of ``node.py``."""
        if self.mode == "plaintext":
            return {}
        assert self.certs is not None
        listener = LISTENER.lower()
        store = self.certs.wrong_host_keystore if self.wrong_host else self.certs.broker_keystore
        props = {
            "listeners": f"{LISTENER}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"{LISTENER}://127.0.0.1:{port}",
            "inter.broker.listener.name": LISTENER,
            "listener.security.protocol.map": f"{LISTENER}:{self.protocol},CONTROLLER:PLAINTEXT",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(store),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.certs.ca),
        }
        if self.wrong_host:
            # the brokers must still reach each other: only clients are meant to refuse it
            props["ssl.endpoint.identification.algorithm"] = ""
        if self.mode == "mtls":
            props["ssl.client.auth"] = "required"
        if self.scram:
            mech = self.scram.lower()
            props["sasl.enabled.mechanisms"] = self.scram
            props["sasl.mechanism.inter.broker.protocol"] = self.scram
            props[f"listener.name.{listener}.{mech}.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{BROKER_USER}" password="{self.broker_password}";'
            )
        return props

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments creating the SCRAM users."""
        if not self.scram:
            return []
        users = {**self.users, BROKER_USER: self.broker_password}
        args: list[str] = []
        for name, password in users.items():
            args += ["--add-scram", f"{self.scram}=[name={name},password={password}]"]
        return args

    def client_conf(self, user: str = CLIENT_USER) -> dict[str, str]:
        """librdkafka settings of a client that gets in (``user`` under SCRAM)."""
        if self.mode == "plaintext":
            return {}
        assert self.certs is not None
        conf = {"security.protocol": self.protocol, "ssl.ca.location": str(self.certs.ca)}
        if self.wrong_host:
            # the launcher's own readiness check; what clients see is the case under test
            conf["ssl.endpoint.identification.algorithm"] = "none"
        if self.mode == "mtls":
            cert, key = self.certs.client()
            conf["ssl.certificate.location"] = str(cert)
            conf["ssl.key.location"] = str(key)
        if self.scram:
            password = self.broker_password if user == BROKER_USER else self.users[user]
            conf.update({"sasl.mechanism": self.scram, "sasl.username": user,
                         "sasl.password": password})  # fmt: skip
        return conf


def redact_args(cmd: list[str]) -> list[str]:
    """``cmd`` with the passwords of ``--add-scram`` replaced (for error messages)."""
    out = list(cmd)
    for i, arg in enumerate(out[:-1]):
        if arg == "--add-scram":
            out[i + 1] = out[i + 1].split("=[", 1)[0] + "=[redacted]"
    return out
