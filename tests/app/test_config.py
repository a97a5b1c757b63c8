"""Service configuration: file, environment and flags, and the errors a wrong one gets.

Tries to break: precedence (flag > env > file > default), a typo'd key or section being
silently ignored, malformed sizes, volumes and addresses passing unnoticed.
"""

from __future__ import annotations

import pytest

from pipeline.app.config import load_config, parse_size
from pipeline.errors import ConfigError

BASE = {"LOWMARK_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_precedence_flag_over_env_over_file(tmp_path):
    path = _write(tmp_path, '[apply]\nsite = "from-file"\ncheckpoint_interval_s = 5\n')
    assert load_config(path, environ=BASE).apply.site == "from-file"
    env = {**BASE, "LOWMARK_APPLY_SITE": "from-env"}
    assert load_config(path, environ=env).apply.site == "from-env"
    flags = {"apply": {"site": "from-flag"}}
    cfg = load_config(path, flags, environ=env)
    assert cfg.apply.site == "from-flag"
    assert cfg.apply.checkpoint_interval_s == 5.0  # untouched keys keep the file's value


def test_bootstrap_precedence(tmp_path):
    path = _write(tmp_path, '[kafka]\nbootstrap_servers = "file:1"\n')
    assert load_config(path, environ={}).kafka.bootstrap_servers == "file:1"
    assert (
        load_config(path, environ={"LOWMARK_BOOTSTRAP_SERVERS": "env:2"}).kafka.bootstrap_servers
        == "env:2"
    )
    cfg = load_config(
        path,
        {"kafka": {"bootstrap_servers": "flag:3"}},
        environ={"LOWMARK_BOOTSTRAP_SERVERS": "env:2"},
    )
    assert cfg.kafka.bootstrap_servers == "flag:3"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[apply]\nsiet = 'x'\n", "unknown keys ['siet']"),
        ("[aply]\nsite = 'x'\n", "unknown sections ['aply']"),
        ("[apply]\ncheckpoint_interval_s = 'soon'\n", "is not a float"),
        ("[[serve.volumes]]\nname = 'v'\nsize = 'huge'\n", "is not a size"),
        ("[[serve.volumes]]\nname = 'v'\n", "needs name and size"),
        (
            "[[serve.volumes]]\nname = 'v'\nsize = '1G'\nmode = 'maybe'\n",
            "must be 'async' or 'sync'",
        ),
        ("not toml = = =\n", "not valid TOML"),
    ],
)
def test_wrong_config_gets_a_specific_error(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ=BASE)
    assert needle in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ=BASE)


def test_volumes_from_env_and_flags(tmp_path):
    env = {**BASE, "LOWMARK_SERVE_VOLUMES": "a:1GiB,b:64MiB:sync"}
    vols = load_config(None, environ=env).serve.volumes
    assert [(v.name, v.size, v.mode) for v in vols] == [
        ("a", 1 << 30, "async"),
        ("b", 64 << 20, "sync"),
    ]
    flags = {"serve": {"volumes": ["c:4096"]}}
    assert [v.name for v in load_config(None, flags, environ=env).serve.volumes] == ["c"]
    # an empty flag list (no --volume given) keeps what the env/file said
    assert len(load_config(None, {"serve": {"volumes": []}}, environ=env).serve.volumes) == 2


@pytest.mark.parametrize(
    "text, size",
    [("4096", 4096), ("64KiB", 65536), ("1G", 1 << 30), ("2 GiB", 2 << 30), (512, 512)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_an_unknown_kafka_key_is_an_error_naming_it(tmp_path):
    # a typo must not leave lowmark connecting without the password it was given
    path = _write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_pasword = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=BASE)
    msg = str(info.value)
    assert "['sasl_pasword']" in msg and "sasl_password" in msg
    assert "'x'" not in msg


def test_every_documented_kafka_key_is_accepted_in_the_file(tmp_path):
    path = _write(tmp_path, """
[kafka]
bootstrap_servers = "h:9093"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "u"
sasl_password = "p"
ssl_ca_location = "/ca.pem"
ssl_certificate_location = "/c.pem"
ssl_key_location = "/k.pem"
ssl_key_password = "kp"
ssl_endpoint_identification_algorithm = "none"
client_id = "me"
extra = "socket.keepalive.enable=true"
""")
    kafka = load_config(path, environ={}).kafka
    assert kafka.bootstrap_servers == "h:9093" and kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.ssl_endpoint_identification_algorithm == "none" and kafka.client_id == "me"
    assert kafka.extra == {"socket.keepalive.enable": "true"}
