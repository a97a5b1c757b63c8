"""Schema evolution: a payload written with an old writer schema (``<name>.v<N>.avsc``)
still decodes, resolved to the current schema by Avro; a corrupted old one is still caught."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ChecksumMismatchError, ConfigError
from schemas import codec
from schemas.records import RECORDS, CgRecord, Marker

SCHEMA_DIR = Path(codec.__file__).parent


@dataclasses.dataclass(frozen=True, slots=True)
class MarkerV2(CgRecord):
    """Marker as it would be after the evolution below: ``note`` added with a default."""

    TYPE = "Marker"
    SCHEMA = "marker"
    name: str
    ts: int
    interceptor_id: str
    epoch: int
    created_us: int
    note: str = ""

    def to_avro(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> MarkerV2:  # type: ignore[override]
        return cls(**d)

    def check(self) -> None:
        Marker(self.name, self.ts, self.interceptor_id, self.epoch, self.created_us).check()


def test_old_writer_schema_resolves_to_current(tmp_path: Path, monkeypatch:
                                               pytest.MonkeyPatch) -> None:
    """Ship marker.avsc as marker.v1.avsc; a new Marker adds `note` with a default."""
    for f in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(SCHEMA_DIR / "marker.avsc", tmp_path / "marker.v1.avsc")
    new = json.loads((SCHEMA_DIR / "marker.avsc").read_text())
    new["fields"].insert(-1, {"name": "note", "type": "string", "default": ""})
    (tmp_path / "marker.avsc").write_text(json.dumps(new))

    old_record = Marker("m", 5, "i", 2, 9)
    old_payload = codec.encode(old_record)
    # the registry refuses a class that does not match its (evolved) schema ...
    with pytest.raises(ConfigError, match="fields"):
        codec._build_registry(tmp_path)
    # ... and takes the evolved class
    evolved = tuple(MarkerV2 if c is Marker else c for c in RECORDS)
    current, by_fp = codec._build_registry(tmp_path, evolved)
    monkeypatch.setattr(codec, "_CURRENT", current)
    monkeypatch.setattr(codec, "_BY_FP", by_fp)

    decoded = codec.decode(old_payload, expected=MarkerV2)
    assert decoded == MarkerV2("m", 5, "i", 2, 9, note="")
    assert codec.writer_fingerprint(old_payload) != codec.fingerprint(MarkerV2)
    fresh_payload = codec.encode(MarkerV2("m", 5, "i", 2, 9, note="hi"))
    assert codec.decode(fresh_payload).note == "hi"  # type: ignore[attr-defined]
    assert codec.writer_fingerprint(fresh_payload) == codec.fingerprint(MarkerV2)
    # A corrupted old-version payload is still caught.
    with pytest.raises(ChecksumMismatchError):
        codec.decode(old_payload[:-2] + bytes([old_payload[-2] ^ 1]) + old_payload[-1:])




def _old_payload(schema_file: str, record: dict[str, Any]) -> bytes:
    """``record`` encoded as a lowmark that shipped ``schema_file`` wrote it."""
    import io

    import fastavro
    from crc32c import crc32c

    parsed, fp = codec._load(SCHEMA_DIR / schema_file)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, {**record, "crc32c": 0})
    body = codec.MAGIC + fp + buf.getvalue()[:-1]  # crc32c=0 is the single byte 00
    return body + codec._crc_varint(crc32c(body))


@pytest.mark.parametrize(
    ("schema_file", "record", "defaults"),
    [
        ("marker_phase.v1.avsc",
         {"marker_id": "m", "name": "n", "step": "QUIESCE", "interceptor_id": "", "ts": 0,
          "emitter": "a", "timeout_ms": 10, "members": ["a"], "error": "", "sent_us": 1},
         {"snapshot": False, "volumes": ()}),
        ("checkpoint.v2.avsc",
         {"site": "dr", "cg": "c", "w": 5, "log_offsets": [], "volumes": [], "written_us": 1,
          "generation": 2},
         {"snapshots": ()}),
    ],
)  # fmt: skip
def test_shipped_schemas_still_decode(
    schema_file: str, record: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """A step or checkpoint written before snapshots existed decodes with the defaults."""
    payload = _old_payload(schema_file, record)
    decoded = codec.decode(payload)
    assert codec.writer_fingerprint(payload) != codec.fingerprint(type(decoded))
    for field, value in defaults.items():
        assert getattr(decoded, field) == value
    assert decoded.to_avro()["cg" if "cg" in record else "name"] == record.get("cg", "n")
