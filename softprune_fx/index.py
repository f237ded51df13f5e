"""A flat numbering of every prunable channel: group channels, then site-group positions.

The cost model, the SCP masks and the budget decision all work on one vector with an
entry per channel; ``ChannelIndex`` maps between that vector, group indices (``drop``
dicts) and the atoms of mask sites. Frozen channels map to -1 ("always kept").

Example::

    index = ChannelIndex(cg)
    keep = np.ones(index.size, bool); keep[index.ids("layer1.0.conv1")[:3]] = False
    index.drop_from_keep(keep)            # {"layer1.0.conv1": [0, 1, 2]}
"""
from __future__ import annotations

import numpy as np

from softprune_fx.passes.flow import Site

from .graph import ChannelGraph


class ChannelIndex:
    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        self.offsets: dict[str, int] = {}
        self.group_of: list[tuple[str, int]] = []
        frozen = []
        self.flat_of_root: dict[int, int] = {}
        for g in cg.groups:
            self.offsets[g.id] = len(self.group_of)
            fz = set(g.frozen_channels)
            for i in range(g.width):
                self.group_of.append((g.id, i))
                frozen.append(i in fz)
                if not g.is_site_group:
                    self.flat_of_root[g.classes[i]] = self.offsets[g.id] + i
        self.size = len(self.group_of)
        self.frozen = np.asarray(frozen, dtype=bool)
        self._table = cg.flow.table
        self._flat_of_root = np.full(max(len(self._table), 1), -1, dtype=np.int64)
        for r, f in self.flat_of_root.items():
            self._flat_of_root[r] = f
        self.site_group = {id(g.site): g for g in cg.groups if g.site is not None}

    def ids(self, gid: str) -> np.ndarray:
        g = self.cg.by_id[gid]
        return np.arange(self.offsets[gid], self.offsets[gid] + g.width)

    def atom_ids(self, atoms: np.ndarray, frozen: bool = False) -> np.ndarray:
        """Flat id of each atom's class: -1 for sentinels, and for frozen channels unless
        ``frozen`` (they are always kept, so masks and costs treat them as constants)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        flat = np.where(atoms >= 0, self._flat_of_root[np.maximum(self._table.find(atoms), 0)], -1)
        if not frozen:
            flat = np.where((flat >= 0) & self.frozen[np.maximum(flat, 0)], -1, flat)
        return flat

    def site_ids(self, site: Site) -> tuple[np.ndarray, np.ndarray]:
        """Per position of a mask site: (class flat id, site-group flat id), -1 = none."""
        cls = self.atom_ids(site.atoms)
        sg = np.full(len(site.atoms), -1, dtype=np.int64)
        g = self.site_group.get(id(site))
        if g is not None:
            sg = self.ids(g.id)
            sg = np.where(self.frozen[sg], -1, sg)
        return cls, sg

    def drop_from_keep(self, keep: np.ndarray) -> dict[str, list[int]]:
        drop: dict[str, list[int]] = {}
        for f in np.flatnonzero(~np.asarray(keep, dtype=bool)):
            if self.frozen[f]:
                continue
            gid, i = self.group_of[f]
            drop.setdefault(gid, []).append(i)
        return drop

    def keep_from_drop(self, drop: dict | None) -> np.ndarray:
        keep = np.ones(self.size, dtype=bool)
        for gid, indices in (drop or {}).items():
            keep[self.offsets[gid] + np.asarray(list(indices), dtype=np.int64)] = False
        return keep
