"""Hypothesis strategies of every record type, as the plain Avro dicts the schema files
define (``test_codec`` turns them into typed records)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from schemas.records import (
    CgRoles,
    Checkpoint,
    DrainRequest,
    Marker,
    MarkerPhase,
    Progress,
    Record,
    SiteEntry,
    Snapshot,
    VolumeChange,
    VolumeEntry,
    Watermark,
    Write,
    Zero,
)

LONG = st.integers(0, 2**63 - 1)
SMALL = st.integers(0, 2**40)
NAME = st.text(min_size=1, max_size=12)


# ---------------------------------------------------------------- strategies


@st.composite
def writes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Write: whole writes and fragmented ones, the first/last possibly cut."""
    n_writes = draw(st.integers(1, 4))
    base_ts = draw(st.integers(0, 2**62))
    ts_list = sorted(
        set(draw(st.lists(st.integers(0, 2**20), min_size=n_writes, max_size=n_writes)))
    )
    extents: list[dict[str, Any]] = []
    for w, dts in enumerate(ts_list):
        length = draw(st.integers(1, 40))
        count = draw(st.integers(1, min(length, 4)))
        cuts = (
            sorted(
                draw(st.sets(st.integers(1, length - 1), min_size=count - 1, max_size=count - 1))
            )
            if count > 1
            else []
        )
        bounds = [0, *cuts, length]
        start = draw(st.integers(0, 2**40))
        data = draw(st.binary(min_size=length, max_size=length))
        frags = [
            {
                "ts": base_ts + dts,
                "offset": start + bounds[i],
                "write_length": length,
                "fragment_index": i,
                "fragment_count": count,
                "data": data[bounds[i] : bounds[i + 1]],
            }
            for i in range(count)
        ]
        # Only the record's first write may begin, and its last may end, elsewhere.
        if w == 0:
            frags = frags[draw(st.integers(0, count - 1)) :]
        if w == len(ts_list) - 1:
            frags = frags[: draw(st.integers(1, len(frags)))]
        extents.extend(frags)
    return {
        "volume_id": draw(NAME),
        "interceptor_id": draw(NAME),
        "epoch": draw(SMALL),
        "extents": extents,
    }


def _po() -> st.SearchStrategy[list[dict[str, int]]]:
    # sorted: the typed records hold {partition: offset} and write it by partition
    return (
        st.lists(st.integers(0, 2**31 - 1), unique=True, max_size=5)
        .map(sorted)
        .flatmap(
            lambda parts: st.tuples(*[LONG for _ in parts]).map(
                lambda offs: [
                    {"partition": p, "offset": o} for p, o in zip(parts, offs, strict=True)
                ]
            )
        )
    )


@st.composite
def roles(draw: st.DrawFn) -> dict[str, Any]:  # generations rise, cuts never fall
    gens = sorted(draw(st.sets(st.integers(1, 2**40), max_size=4)))
    ws = sorted(draw(st.lists(LONG, min_size=len(gens), max_size=len(gens))))
    sites = draw(st.lists(NAME, min_size=len(gens) + 1, max_size=len(gens) + 1))
    history = [
        {
            "generation": g,
            "kind": draw(st.sampled_from(["FAILOVER", "SWITCHOVER"])),
            "from_site": sites[i],
            "to_site": sites[i + 1] + "'",
            "w": w,
            "forced": draw(st.booleans()),
            "at_us": draw(LONG),
        }
        for i, (g, w) in enumerate(zip(gens, ws, strict=True))
    ]
    return {
        "cg": draw(NAME),
        "generation": gens[-1] if gens else 0,
        "primary_site": history[-1]["to_site"] if history else sites[0],
        "base_w": ws[-1] if ws else 0,
        "base_offsets": draw(_po()) if gens else [],
        "history": history,
        "updated_us": draw(LONG),
    }


VOLS = st.lists(NAME, unique=True, max_size=3)
_TAIL = {"interceptor_id": NAME, "epoch": SMALL, "s": LONG, "volumes": VOLS}  # Hold, LostTail

AVRO_STRATEGIES: dict[type[Record], st.SearchStrategy[dict[str, Any]]] = {
    Write: writes(),
    Zero: st.fixed_dictionaries(
        {
            "volume_id": NAME,
            "interceptor_id": NAME,
            "epoch": SMALL,
            "ts": LONG,
            # offset + length must fit in an int64 (the decoder refuses an overflowing range)
            "offset": st.integers(0, 2**62 - 1),
            "length": st.integers(1, 2**62),
            "kind": st.sampled_from(["ZERO", "TRIM"]),
        }
    ),
    Marker: st.fixed_dictionaries(
        {
            "name": NAME,
            "ts": LONG,
            "interceptor_id": NAME,
            "epoch": SMALL,
            "created_us": LONG,
        }
    ),
    Snapshot: st.fixed_dictionaries(
        {
            "name": NAME,
            "ts": LONG,
            "volume_ids": st.lists(NAME, unique=True, max_size=5),
            "interceptor_id": NAME,
            "epoch": SMALL,
        }
    ),
    VolumeChange: st.fixed_dictionaries(
        {
            "op": st.sampled_from(["CREATE", "RESIZE", "DELETE"]),
            "volume_id": NAME,
            "name": st.text(max_size=12),
            "size": LONG,
            "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
            "ts": LONG,
            "interceptor_id": NAME,
            "epoch": SMALL,
        }
    ),
    Progress: st.fixed_dictionaries(
        {
            "interceptor_id": NAME,
            "epoch": st.integers(-1, 2**40),
            "kind": st.sampled_from(["JOIN", "PROGRESS", "LEAVE", "FENCE", "LOST"]),
            "s": LONG,
            "partition_offsets": _po(),
            "wall_us": LONG,
            "async_volumes": VOLS,
            "resynced_volumes": VOLS,
        }
    ),
    Watermark: st.fixed_dictionaries(
        {
            "cg": NAME,
            "w": LONG,
            "log_offsets": _po(),
            "progress_offset": st.integers(-1, 2**40),
            "max_s": LONG,
            "members": st.lists(
                st.fixed_dictionaries(
                    {
                        "interceptor_id": NAME,
                        "epoch": SMALL,
                        "s": LONG,
                        "effective_s": LONG,
                        "last_progress_offset": SMALL,
                        "async_volumes": VOLS,
                    }
                ),
                unique_by=lambda m: m["interceptor_id"],
                max_size=4,
            ),
            "published_us": LONG,
            "departed": st.lists(
                st.fixed_dictionaries(
                    {
                        "interceptor_id": NAME,
                        "epoch": SMALL,
                        "s": LONG,
                    }
                ),
                unique_by=lambda m: m["interceptor_id"],
                max_size=3,
            ),
            "holds": st.lists(
                st.fixed_dictionaries({**_TAIL, "until": st.integers(-1, 2**40)}),
                unique_by=lambda h: (h["interceptor_id"], h["epoch"]),
                max_size=3,
            ),
            "lost": st.lists(st.fixed_dictionaries({**_TAIL, "declared_us": LONG}), max_size=3),
        }
    ),
    Checkpoint: st.fixed_dictionaries(
        {
            "site": NAME,
            "cg": NAME,
            "w": LONG,
            "log_offsets": _po(),
            "volumes": st.lists(
                st.fixed_dictionaries(
                    {
                        "volume_id": NAME,
                        "size": LONG,
                        "digest": st.text(max_size=16),
                    }
                ),
                unique_by=lambda v: v["volume_id"],
                max_size=4,
            ),
            "written_us": LONG,
            "generation": SMALL,
            "snapshots": st.lists(
                st.fixed_dictionaries({"name": NAME, "ts": LONG, "size": LONG}),
                unique_by=lambda h: h["name"],
                max_size=3,
            ),
        }
    ),
    CgRoles: roles(),
    DrainRequest: st.fixed_dictionaries(
        {"cg": NAME, "generation": SMALL, "to_site": NAME, "requested_us": LONG}
    ),
    MarkerPhase: st.one_of(
        st.lists(NAME, min_size=1, max_size=3, unique=True).flatmap(
            lambda ms: st.fixed_dictionaries(
                {
                    "marker_id": NAME,
                    "name": NAME,
                    "step": st.just("QUIESCE"),
                    "interceptor_id": st.just(""),
                    "ts": LONG,
                    "emitter": st.sampled_from(ms),
                    "timeout_ms": st.integers(1, 2**40),
                    "members": st.just(ms),
                    "error": st.text(max_size=20),
                    "sent_us": LONG,
                    "snapshot": st.booleans(),
                    "volumes": st.just([]),
                }
            )
        ),
        *(
            st.fixed_dictionaries(
                {
                    "marker_id": NAME,
                    "name": NAME,
                    "step": st.just(step),
                    "interceptor_id": st.just("") if step == "ABORT" else NAME,
                    "ts": LONG,
                    "emitter": st.text(max_size=8),
                    "timeout_ms": LONG,
                    "members": st.lists(NAME, max_size=3, unique=True),
                    "error": st.text(max_size=20),
                    "sent_us": LONG,
                    "snapshot": st.booleans(),
                    "volumes": st.lists(NAME, max_size=3, unique=True),
                }
            )
            for step in ("QUIESCED", "ABORT", "RESUMED", "COPIED")
        ),
    ),
    VolumeEntry: st.fixed_dictionaries(
        {
            "cg": NAME,
            "volume_id": NAME,
            "name": NAME,
            "size": st.integers(1, 2**40).map(lambda n: n * 512),
            "mode": st.sampled_from(["async", "sync"]),
            "metadata": st.dictionaries(NAME, st.text(max_size=8), max_size=2),
            "deleted": st.booleans(),
            "generation": SMALL,
            "interceptor_id": NAME,
            "ts": LONG,
            "updated_us": LONG,
            "access": st.dictionaries(
                NAME,
                st.sampled_from(["optimized", "non-optimized", "inaccessible", "change"]),
                max_size=2,
            ),
        }
    ),
    SiteEntry: st.fixed_dictionaries(
        {
            "cg": NAME,
            "site": NAME,
            "kind": st.sampled_from(["backup", "primary"]),
            "host": st.text(max_size=8),
            "data_dir": st.text(max_size=12),
            "metrics": st.text(max_size=8),
            "version": st.text(max_size=6),
            "registered_us": LONG,
        }
    ),
}
