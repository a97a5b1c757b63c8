"""Topic names per generation, without a broker.

Tries to break: generation 0 renamed (every deployed CG would lose its topics), a later
generation sharing a topic or a transactional id with an earlier one (an old primary could
write into the new generation), a generation that collides with another CG's names, and a
nonsense generation accepted.
"""

from __future__ import annotations

import dataclasses

import pytest

from connectors.kafka.topics import (
    CONFIG_TOPIC,
    CgTopics,
    check_cg_name,
    roles_key,
    roles_transactional_id,
)
from pipeline.errors import ConfigError

NAMES = ("log", "progress", "watermark", "checkpoints", "deadletter", "control")


def _all(t: CgTopics) -> set[str]:
    return {getattr(t, n) for n in NAMES} | {
        t.transactional_id("i1"),
        t.watermark_transactional_id(),
    }


def test_generation_0_keeps_todays_names_exactly() -> None:
    t = CgTopics("cg1")
    assert t == CgTopics("cg1", 0) and t.generation == 0
    assert [getattr(t, n) for n in NAMES] == [
        "lowmark.cg1.log",
        "lowmark.cg1.progress",
        "lowmark.cg1.watermark",
        "lowmark.cg1.checkpoints",
        "lowmark.cg1.deadletter",
        "lowmark.cg1.control",
    ]
    assert t.transactional_id("host-a") == "lowmark.cg1.interceptor.host-a"
    assert t.watermark_transactional_id() == "lowmark.cg1.watermark-publisher"


def test_later_generations_have_their_own_topics_and_ids() -> None:
    t = CgTopics("cg1", 3)
    assert [getattr(t, n) for n in NAMES] == [
        "lowmark.cg1.g3.log",
        "lowmark.cg1.g3.progress",
        "lowmark.cg1.g3.watermark",
        "lowmark.cg1.g3.checkpoints",
        "lowmark.cg1.g3.deadletter",
        "lowmark.cg1.g3.control",
    ]
    assert t.transactional_id("host-a") == "lowmark.cg1.g3.interceptor.host-a"
    assert t.watermark_transactional_id() == "lowmark.cg1.g3.watermark-publisher"


def test_no_two_generations_or_cgs_share_a_name() -> None:
    seen: dict[str, CgTopics] = {}
    for cg in ("cg1", "cg1-g1", "g1", "cg1_g2"):
        for g in range(4):
            t = CgTopics(check_cg_name(cg), g)
            for name in _all(t):
                assert name not in seen, f"{name} of {t} is also {seen[name]}'s"
                seen[name] = t
    assert CONFIG_TOPIC not in seen
    with pytest.raises(ConfigError):
        check_cg_name("cg1.g1")  # the dot that would make it look like a generation


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_a_nonsense_generation_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="generation must be an integer >= 0"):
        CgTopics("cg1", bad)  # type: ignore[arg-type]


def test_topics_are_values() -> None:
    assert CgTopics("a", 1) == CgTopics("a", 1) != CgTopics("a", 2)
    assert dataclasses.replace(CgTopics("a"), generation=2).log == "lowmark.a.g2.log"
    assert len({CgTopics("a", 1), CgTopics("a", 1)}) == 1


def test_the_roles_of_a_cg_have_one_key_and_one_writer() -> None:
    assert roles_key("cg1") == "roles/cg1"
    assert roles_transactional_id("cg1") == "lowmark.config.roles.cg1"
    assert roles_transactional_id("cg1") not in _all(CgTopics("cg1"))
