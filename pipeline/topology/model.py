"""The topology of one CG as ``lowmark.config`` says it: a pure fold of its records.

Keys (``connectors.kafka.topics``): ``roles/<cg>`` (``CgRoles``: the highest generation
wins), ``volume/<cg>/<id>`` (``VolumeEntry``: the highest (generation, ts) wins, so an old
primary that still publishes cannot undo a newer one's change), ``site/<cg>/<site>``
(``SiteEntry``: the latest wins). A record that does not decode, is of the wrong type, or
names another CG or volume than its key is *rejected*: listed with its offset and why, and
it changes nothing (the entry before it stands). A tombstone (an operator's
``kcat -K: -Z``) removes a volume or site entry.

No I/O: ``pipeline.topology.catalog`` reads the records, this module decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.topics import roles_key
from pipeline.errors import RecordError
from schemas import codec
from schemas.records import CgRoles, Checkpoint, SiteEntry, VolumeEntry

__all__ = ["Rejected", "Topology", "fold", "site_volumes"]


@dataclass(frozen=True)
class Rejected:
    offset: int
    key: str
    why: str


@dataclass
class Topology:
    cg: str
    roles: CgRoles | None = None
    #: volume id -> its latest entry, deleted ones included (``live`` leaves them out)
    volumes: dict[str, VolumeEntry] = field(default_factory=dict)
    sites: dict[str, SiteEntry] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def generation(self) -> int:
        return self.roles.generation if self.roles is not None else 0

    @property
    def primary_site(self) -> str:
        return self.roles.primary_site if self.roles is not None else ""

    def live(self) -> dict[str, VolumeEntry]:
        return {vid: v for vid, v in sorted(self.volumes.items()) if not v.deleted}

    def as_dict(self) -> dict[str, Any]:
        return {
            "cg": self.cg,
            "generation": self.generation,
            "primary_site": self.primary_site,
            "volumes": [v.to_avro() for v in self.live().values()],
            "deleted_volumes": sorted(v for v, e in self.volumes.items() if e.deleted),
            "sites": [s.to_avro() for _n, s in sorted(self.sites.items())],
            "rejected": [r.__dict__ for r in self.rejected],
        }


def fold(cg: str, records: Iterable[tuple[int, str, bytes | None]]) -> Topology:
    """The topology of ``cg`` from ``lowmark.config``'s (offset, key, value), in offset
    order; keys of other CGs and other kinds are ignored."""
    topo = Topology(cg)
    vol_prefix, site_prefix, roles = f"volume/{cg}/", f"site/{cg}/", roles_key(cg)
    for offset, key, value in records:
        if key == roles:
            _roles(topo, offset, key, value)
        elif key.startswith(vol_prefix):
            _volume(topo, offset, key, key[len(vol_prefix) :], value)
        elif key.startswith(site_prefix):
            _site(topo, offset, key, key[len(site_prefix) :], value)
    return topo


def _decode(topo: Topology, offset: int, key: str, value: bytes, cls: type) -> Any:
    try:
        return codec.decode(value, cls)
    except RecordError as exc:
        topo.rejected.append(Rejected(offset, key, str(exc)))
        return None


def _roles(topo: Topology, offset: int, key: str, value: bytes | None) -> None:
    if value is None:
        return  # roles are never deleted; a tombstone leaves the last ones standing
    rec = _decode(topo, offset, key, value, CgRoles)
    if rec is None:
        return
    if rec.cg != topo.cg:
        topo.rejected.append(Rejected(offset, key, f"the record names CG {rec.cg!r}"))
    elif topo.roles is None or rec.generation >= topo.roles.generation:
        topo.roles = rec


def _volume(topo: Topology, offset: int, key: str, vid: str, value: bytes | None) -> None:
    if value is None:
        topo.volumes.pop(vid, None)
        return
    rec = _decode(topo, offset, key, value, VolumeEntry)
    if rec is None:
        return
    if rec.cg != topo.cg or rec.volume_id != vid:
        why = f"the record describes volume {rec.volume_id!r} of CG {rec.cg!r}"
        topo.rejected.append(Rejected(offset, key, why))
        return
    have = topo.volumes.get(vid)
    if have is None or (rec.generation, rec.ts) >= (have.generation, have.ts):
        topo.volumes[vid] = rec


def _site(topo: Topology, offset: int, key: str, site: str, value: bytes | None) -> None:
    if value is None:
        topo.sites.pop(site, None)
        return
    rec = _decode(topo, offset, key, value, SiteEntry)
    if rec is None:
        return
    if rec.cg != topo.cg or rec.site != site:
        why = f"the record describes site {rec.site!r} of CG {rec.cg!r}"
        topo.rejected.append(Rejected(offset, key, why))
        return
    topo.sites[site] = rec


def site_volumes(topo: Topology, ckpt: Checkpoint | None) -> dict[str, str]:
    """Per live volume of the model: whether a site's checkpoint holds it as described
    ("ok"), at another size ("size <n>: not yet applied"), or not at all ("missing")."""
    held = {v.volume_id: v.size for v in ckpt.volumes} if ckpt is not None else {}
    out = {}
    for vid, v in topo.live().items():
        if vid not in held:
            out[vid] = "missing"
        elif held[vid] != v.size:
            out[vid] = f"size {held[vid]}: not yet applied"
        else:
            out[vid] = "ok"
    return out
