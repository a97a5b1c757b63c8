"""One configuration file for every lowmark service, with env and flag overrides.

    [kafka]                      # or LOWMARK_BOOTSTRAP_SERVERS / LOWMARK_KAFKA_* / embedded
    bootstrap_servers = "127.0.0.1:9092"

    [cg]
    name = "demo"
    log_partitions = 4

    [serve]                      # the interceptor + NBD server of a primary
    site = "site-a"              # this primary's site, as the roles name it ("" : unnamed)
    interceptor_id = "primary-a"
    data_dir = "/var/lib/lowmark/primary"
    listen = "127.0.0.1:10809"   # "" to disable TCP
    unix_socket = ""             # a path to also listen on a unix socket
    metrics = "127.0.0.1:9464"
    region_bytes = "64KiB"       # dirty-region log granularity; "0" turns it off
    region_extent_bytes = "4MiB" # its activity log's extent; "0": writes wait per region
    admin_socket = "auto"        # `lowmark volume` talks to it; "" turns it off
    allow_single_copy_sync = false  # sync volumes on a 1-copy log topic (development only)
    [[serve.volumes]]
    name = "vol1"
    size = "1GiB"
    mode = "async"               # or "sync"

    [watermark]
    liveness_timeout_s = 10
    metrics = "127.0.0.1:9465"

    [apply]
    site = "dr1"
    data_dir = "/var/lib/lowmark/dr1"
    metrics = "127.0.0.1:9466"

    [markers]                    # markers on a schedule (the active watermark takes them)
    interval_s = 300             # 0: none
    name = "auto"                # each is <name>-<UTC time>
    pre_hook = ""                # as `lowmark marker --pre-hook`
    post_hook = ""
    timeout_s = 5

    [snapshots]                  # named snapshots' retention, at every applier alike
    keep_last = 20               # the newest N (0: any number)
    max_age_s = 604800           # none older (0: any age); the newest is always kept

Precedence: command-line flag > environment (``LOWMARK_<SECTION>_<KEY>``, e.g.
``LOWMARK_APPLY_SITE``) > file > default. Unknown keys are errors, not silently ignored:
a typo in a DR config must not go unnoticed until the disaster.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from connectors.kafka.config import ENV_KEYS, KafkaConnection, resolve
from pipeline.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, what: str = "size") -> int:
    """``4096``, ``"64KiB"``, ``"1G"``, ``"2 GiB"`` -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{what} {value!r} is not a size (examples: 4096, 64KiB, 1GiB)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_hostport(value: str, what: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} {value!r} must be host:port (e.g. 127.0.0.1:10809)")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    mode: str = "async"


@dataclass(frozen=True)
class CgSection:
    name: str = "demo"
    log_partitions: int = 4
    replication_factor: int = 0  # 0: min(3, brokers)


@dataclass(frozen=True)
class ServeSection:
    #: the site this primary is (the roles' primary_site); "" runs only generation 0
    site: str = ""
    interceptor_id: str = "primary"
    data_dir: str = "./.lowmark/primary"
    listen: str = "127.0.0.1:10809"
    unix_socket: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_required: bool = False
    metrics: str = ""
    tick_interval_ms: float = 10.0
    max_clock_skew_us: int = 0
    max_unreplicated_bytes: str = "256MiB"
    replication_timeout_s: float = 30.0
    #: how often the roles are read while serving: a newer generation fences this primary
    generation_check_s: float = 1.0
    #: the dirty-region log's granularity ("0": off, a crash loses the async tail)
    region_bytes: str = "64KiB"
    #: the activity log over it (a write waits for its extent only; "0": for its regions)
    region_extent_bytes: str = "4MiB"
    #: a named snapshot's background copy at most this fast per second ("0": unlimited)
    snapshot_copy_rate: str = "0"
    #: the local admin socket (``lowmark volume``): "auto" is <data_dir>/state/admin.sock,
    #: "" turns it off
    admin_socket: str = "auto"
    #: a sync volume on a log topic with one copy (a 1-broker development cluster): its
    #: acknowledgement survives no broker loss, so it is refused unless this is set
    allow_single_copy_sync: bool = False
    volumes: tuple[VolumeSpec, ...] = ()


@dataclass(frozen=True)
class WatermarkSection:
    liveness_timeout_s: float = 10.0
    metrics: str = ""


@dataclass(frozen=True)
class ApplySection:
    site: str = "backup"
    data_dir: str = "./.lowmark/backup"
    checkpoint_interval_s: float = 1.0
    max_pending_bytes: str = "256MiB"
    snapshot_interval_s: float = 0.0
    snapshots_kept: int = 4
    #: per-volume digests in a running site's checkpoint this often (0: only at a clean
    #: stop); each costs a read of every allocated byte, during which nothing is applied
    digest_interval_s: float = 0.0
    metrics: str = ""

    def __post_init__(self) -> None:
        if self.digest_interval_s < 0:
            raise ConfigError(f"[apply] digest_interval_s {self.digest_interval_s} must be "
                              ">= 0 (0: digests only at a clean stop)")  # fmt: skip


@dataclass(frozen=True)
class MarkersSection:
    """Markers on a schedule, taken by the active `lowmark watermark` (0: none)."""

    interval_s: float = 0.0
    name: str = "auto"
    pre_hook: str = ""
    post_hook: str = ""
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.interval_s < 0 or 0 < self.interval_s < 0.05:
            raise ConfigError(f"[markers] interval_s {self.interval_s} must be 0 (no schedule) "
                              "or at least 0.05 seconds")  # fmt: skip
        if self.timeout_s <= 0:
            raise ConfigError(f"[markers] timeout_s {self.timeout_s} must be > 0")
        if not self.name:
            raise ConfigError("[markers] name must not be empty: markers are found by it")


@dataclass(frozen=True)
class SnapshotsSection:
    """Named snapshots' retention (``lowmark snapshot``), applied by every applier: the
    same rule over the same snapshots keeps the same ones at every site."""

    keep_last: int = 0
    max_age_s: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.max_age_s < 0:
            raise ConfigError(f"[snapshots] keep_last {self.keep_last} and max_age_s "
                              f"{self.max_age_s} must not be negative (0: no limit)")  # fmt: skip


@dataclass(frozen=True)
class LowmarkConfig:
    kafka: KafkaConnection
    cg: CgSection = field(default_factory=CgSection)
    serve: ServeSection = field(default_factory=ServeSection)
    watermark: WatermarkSection = field(default_factory=WatermarkSection)
    apply: ApplySection = field(default_factory=ApplySection)
    markers: MarkersSection = field(default_factory=MarkersSection)
    snapshots: SnapshotsSection = field(default_factory=SnapshotsSection)
    source: str = "defaults"

    def kafka_conf(self) -> dict[str, str]:
        return self.kafka.librdkafka()

    @property
    def replication_factor(self) -> int | None:
        return self.cg.replication_factor or None


_SECTIONS = {
    "cg": CgSection,
    "serve": ServeSection,
    "watermark": WatermarkSection,
    "apply": ApplySection,
    "markers": MarkersSection,
    "snapshots": SnapshotsSection,
}


def _coerce(cls: type, section: str, raw: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(
            f"[{section}] has unknown keys {sorted(unknown)}; known keys: {sorted(known)}"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        default = known[name].default
        if name == "volumes":
            values[name] = tuple(_volume(v) for v in value)
            continue
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                values[name] = bool(value)
            elif isinstance(default, int):
                values[name] = int(value)
            elif isinstance(default, float):
                values[name] = float(value)
            else:
                values[name] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"[{section}] {name} = {value!r} is not a {type(default).__name__}"
            ) from None
    return cls(**values)


def _volume(raw: Any) -> VolumeSpec:
    if isinstance(raw, str):  # "name:size[:mode]" from env or flags
        parts = raw.split(":")
        raw = {
            "name": parts[0],
            "size": parts[1] if len(parts) > 1 else "",
            "mode": (parts[2:] or ["async"])[0],
        }
    if not isinstance(raw, Mapping) or "name" not in raw or "size" not in raw:
        raise ConfigError(f"volume {raw!r} needs name and size (e.g. name = 'vol1', size = '1GiB')")
    mode = str(raw.get("mode", "async"))
    if mode not in ("async", "sync"):
        raise ConfigError(f"volume {raw['name']}: mode {mode!r} must be 'async' or 'sync'")
    return VolumeSpec(str(raw["name"]), parse_size(raw["size"], f"volume {raw['name']} size"), mode)


def load_config(
    path: Path | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    embedded: Callable[[str], str | None] | None = None,
) -> LowmarkConfig:
    """File, then ``LOWMARK_<SECTION>_<KEY>`` env, then ``overrides`` (from flags).

    ``embedded`` finds a running development cluster when no bootstrap is configured (the
    CLI passes the launcher's ``find_bootstrap``); without it a missing bootstrap fails.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and env.get("LOWMARK_CONFIG"):
        path = env["LOWMARK_CONFIG"]
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - set(_SECTIONS) - {"kafka"}
    if unknown:
        raise ConfigError(f"config has unknown sections {sorted(unknown)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = dict(data.get(name, {}))
        for f in fields(cls):
            key = f"LOWMARK_{name.upper()}_{f.name.upper()}"
            if key in env and env[key] != "":
                raw[f.name] = env[key].split(",") if f.name == "volumes" else env[key]
        for k, v in (overrides or {}).get(name, {}).items():
            if v is not None and v != () and v != []:
                raw[k] = v
        sections[name] = _coerce(cls, name, raw)
    kafka = _kafka(dict(data.get("kafka", {})), (overrides or {}).get("kafka", {}), env, embedded)
    return LowmarkConfig(kafka=kafka, source=str(path or "defaults"), **sections)


def _kafka(
    raw: dict[str, Any],
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    embedded: Callable[[str], str | None] | None = None,
) -> KafkaConnection:
    """bootstrap: flag > env > file > the embedded cluster; security: env > file."""
    unknown = {k for k in raw if k != "bootstrap_servers" and k.upper() not in ENV_KEYS}
    if unknown:
        # a typo in sasl_password must not leave lowmark connecting without one
        known = sorted(["bootstrap_servers", *(k.lower() for k in ENV_KEYS)])
        raise ConfigError(f"[kafka] has unknown keys {sorted(unknown)}; known keys: {known}")
    bootstrap = flags.get("bootstrap_servers") or raw.pop("bootstrap_servers", None)
    merged = {f"LOWMARK_KAFKA_{k.upper()}": str(v) for k, v in raw.items()}
    merged.update(env)
    if env.get("LOWMARK_BOOTSTRAP_SERVERS") and not flags.get("bootstrap_servers"):
        bootstrap = None  # the environment beats the file
    return resolve(bootstrap, environ=merged, embedded=embedded)
