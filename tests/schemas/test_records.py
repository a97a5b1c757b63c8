"""Try to break the record registry (``schemas.records``).

The registry, the schema files and the README's table must name the same record types,
with the same fields in the same order; every registered class round-trips through the
codec (``tests/schemas/test_codec.py::test_round_trip``, hypothesis, parametrized over
``RECORDS``); an unknown header type or an unregistered class is refused with a clear
error; the per-partition offsets shape is built and parsed in one place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, CorruptRecordError, RecordError, UnknownSchemaError
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    RECORDS,
    CgRecord,
    LogRecord,
    Progress,
    ProgressKind,
    Record,
    VolumeRecord,
    Watermark,
    offsets_from_avro,
    offsets_to_avro,
    record_class,
)

SCHEMA_DIR = Path(codec.__file__).parent


def test_registry_and_schema_files_agree() -> None:
    current = {p.stem for p in SCHEMA_DIR.glob("*.avsc") if not re.search(r"\.v\d+$", p.stem)}
    assert {c.SCHEMA for c in RECORDS} == current, "an .avsc without a class, or the reverse"
    for cls in RECORDS:
        raw = json.loads((SCHEMA_DIR / f"{cls.SCHEMA}.avsc").read_text())
        assert raw["name"] == cls.TYPE == cls.__name__
        fields = [f["name"] for f in raw["fields"]]
        assert fields[-1] == "crc32c"
        assert [f.name for f in dataclasses.fields(cls)] == fields[:-1]  # type: ignore[arg-type]
    assert len({c.TYPE for c in RECORDS}) == len(RECORDS)


def test_readme_table_lists_exactly_the_registry() -> None:
    readme = (SCHEMA_DIR / "README.md").read_text()
    rows = re.findall(r"^\| (\w+) \| `(\w+)\.avsc` \| `[0-9a-f]{16}` \|$", readme, re.M)
    assert rows == [(c.TYPE, c.SCHEMA) for c in RECORDS]


def test_base_classes_place_every_record() -> None:
    assert tuple(c for c in RECORDS if issubclass(c, LogRecord)) == LOG_RECORDS
    for cls in LOG_RECORDS:
        assert issubclass(cls, VolumeRecord) != issubclass(cls, CgRecord), cls
    for cls in RECORDS:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        assert "__dict__" not in dir(cls), f"{cls.__name__} is not slotted"


def test_records_are_frozen() -> None:
    rec = Progress("a", 0, ProgressKind.JOIN, 1, {}, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.s = 2  # type: ignore[misc]


def test_unknown_header_type_is_refused() -> None:
    assert record_class("Write").TYPE == "Write"
    for name in ("Nope", "write", "", "Write "):
        with pytest.raises(UnknownSchemaError, match="unknown record type"):
            record_class(name)


@dataclasses.dataclass(frozen=True, slots=True)
class Unregistered(Record):
    TYPE = "Marker"  # even posing as a registered type
    SCHEMA = "marker"
    name: str = "m"


def test_an_unregistered_class_is_refused_everywhere() -> None:
    for call in (
        lambda: codec.encode(Unregistered()),
        lambda: codec.fingerprint(Unregistered),
        lambda: codec.schema_of(Unregistered),
        lambda: codec.headers_for(Unregistered()),
    ):
        with pytest.raises(UnknownSchemaError, match="not a registered record type"):
            call()
    payload = codec.encode(Progress("a", 0, ProgressKind.JOIN, 1, {}, 0))
    with pytest.raises(UnknownSchemaError, match="was expected"):
        codec.decode(payload, Unregistered)
    assert isinstance(codec.decode(payload, (Unregistered, Progress)), Progress)


def test_a_class_out_of_step_with_its_schema_does_not_load(tmp_path: Path) -> None:
    for f in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    raw = json.loads((tmp_path / "zero.avsc").read_text())
    raw["fields"][0], raw["fields"][1] = raw["fields"][1], raw["fields"][0]  # reordered
    (tmp_path / "zero.avsc").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="schema order"):
        codec._build_registry(tmp_path)


def test_offsets_shape_is_built_and_parsed_in_one_place() -> None:
    assert offsets_to_avro({3: 9, 0: 1}) == [
        {"partition": 0, "offset": 1},
        {"partition": 3, "offset": 9},
    ]
    assert offsets_from_avro("Watermark", "log_offsets", offsets_to_avro({3: 9, 0: 1})) == {
        0: 1,
        3: 9,
    }
    with pytest.raises(CorruptRecordError, match="repeated partition 1"):
        offsets_from_avro("Watermark", "log_offsets", [{"partition": 1, "offset": 0}] * 2)
    wm = Watermark("cg", 5, {2: 7}, 3, 5, (), 1)
    assert wm.to_avro()["log_offsets"] == [{"partition": 2, "offset": 7}]
    assert codec.decode(codec.encode(wm), Watermark).log_offsets == {2: 7}


@pytest.mark.parametrize(
    "bad",
    [
        Progress("a", 0, "JOIN", 1, {}, 0),  # type: ignore[arg-type]  # a str, not the enum
        Progress("a", 0, ProgressKind.JOIN, 1, {-1: 0}, 0),
        Progress("a", 0, ProgressKind.JOIN, 1, {0: -1}, 0),
        Watermark("cg", 5, {2: 7}, -2, 5, (), 1),
    ],
)
def test_impossible_typed_values_are_refused(bad: Record) -> None:
    with pytest.raises(RecordError):
        codec.encode(bad)


def test_the_hot_records_hand_init_behaves_like_the_dataclass_one() -> None:
    from schemas.records import Write, WriteExtent

    by_kw = WriteExtent(
        ts=1, offset=2, write_length=3, fragment_index=0, fragment_count=1, data=b"a"
    )
    assert by_kw == WriteExtent(1, 2, 3, 0, 1, b"a") and hash(by_kw) == hash(
        WriteExtent(1, 2, 3, 0, 1, b"a")
    )
    assert dataclasses.replace(by_kw, ts=9).ts == 9
    with pytest.raises(TypeError):
        WriteExtent(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_kw.ts = 5  # type: ignore[misc]
    w = Write(volume_id="v", interceptor_id="i", epoch=1, extents=(by_kw,))
    assert w == Write("v", "i", 1, (by_kw,)) and w.timestamps() == [1]


def test_fingerprints_distinct_and_documented() -> None:
    fps = [codec.fingerprint(t) for t in RECORDS]
    assert len(set(fps)) == len(fps)
    readme = (SCHEMA_DIR / "README.md").read_text()
    for rtype, fp in zip(RECORDS, fps, strict=True):
        row = f"| {rtype.TYPE} | `{rtype.SCHEMA}.avsc` | `{fp.to_bytes(8, 'little').hex()}` |"
        assert row in readme, f"schemas/README.md fingerprint table is stale for {rtype.TYPE}"
