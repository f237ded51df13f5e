"""Keep plans: which classes and site-group positions survive a ``drop``.

``drop`` maps group id -> channel indices. A ``Plan`` turns it into per-class keeps and
per-site-group position keeps, and answers "is this element kept?" for any layout, any
mask site and any node of a site group's chain.

Example::

    plan = Plan.from_drop(groups, flow, {"layer1.0.conv1": [0, 3]})
    plan.keep_layout(flow.layouts[node])    # bool array, the layout's shape
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .atoms import NONE, UNKNOWN, along
from .errors import IllegalDropError
from .flow import ChannelFlow, Site
from .groups import Group


@dataclass
class Plan:
    flow: ChannelFlow
    groups: list[Group]
    dropped_classes: set[int] = field(default_factory=set)
    site_drops: dict[str, set[int]] = field(default_factory=dict)

    def __post_init__(self):
        self.by_id = {g.id: g for g in self.groups}
        self.site_group_of: dict[int, Group] = {id(g.site): g for g in self.groups if g.site is not None}
        self.chain_group: dict[fx.Node, Group] = {n: g for g in self.groups for n in g.chain}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_drop(cls, flow: ChannelFlow, groups: list[Group], drop: dict | None) -> "Plan":
        plan = cls(flow, groups)
        for gid, indices in (drop or {}).items():
            g = plan.by_id.get(gid)
            if g is None:
                raise IllegalDropError(f"unknown group {gid!r}; `softprune-fx deps` lists the group ids")
            idx = np.fromiter((int(i) for i in indices), dtype=np.int64)
            bad = idx[(idx < 0) | (idx >= g.width)]
            if len(bad):
                raise IllegalDropError(f"channel {bad[0]} is out of range for group {gid!r} (width {g.width})")
            frozen = [i for i in idx.tolist() if i in g.frozen_channels] if g.frozen_channels else []
            if frozen:
                raise IllegalDropError(f"channel {frozen[0]} of group {gid!r} is frozen: {g.frozen_reason}")
            plan.drop_many(g, idx)
        return plan

    def drop_many(self, g: Group, idx: np.ndarray) -> None:
        """``drop(g, i)`` for every ``i`` of ``idx`` (checked by the caller), in one go."""
        if not len(idx):
            return
        self.__dict__.pop("_dropped_table", None)  # keep_layout's lookup table is rebuilt
        if g.is_site_group:
            self.site_drops.setdefault(g.id, set()).update(idx.tolist())
        else:
            self.dropped_classes.update(np.asarray(g.classes)[idx].tolist())

    def drop(self, g: Group, i: int) -> None:
        self.drop_many(g, np.array([i], dtype=np.int64))

    def to_drop(self) -> dict[str, list[int]]:
        out = {}
        for g in self.groups:
            if g.is_site_group:
                idx = sorted(self.site_drops.get(g.id, ()))
            else:
                idx = [i for i, r in enumerate(g.classes) if r in self.dropped_classes]
            if idx:
                out[g.id] = idx
        return out

    # ------------------------------------------------------------------ queries
    def root(self, atom: int) -> int:
        return int(self.flow.table.roots[atom])

    def keep_layout(self, layout: np.ndarray) -> np.ndarray:
        """True where the element's class is kept (sentinels are always kept)."""
        layout = np.asarray(layout)
        if not self.dropped_classes:
            return np.ones(layout.shape, dtype=bool)
        table = self.__dict__.get("_dropped_table")
        if table is None:  # one keep flag per atom, built once per plan (surgery asks ~600 times)
            roots = self.flow.table.roots
            dropped = np.zeros(len(roots), dtype=bool)
            dropped[np.fromiter(self.dropped_classes, dtype=np.int64)] = True
            # the negative sentinels (NONE, UNKNOWN) index the trailing entries: always kept
            table = np.concatenate([~dropped[roots], np.ones(-min(NONE, UNKNOWN), dtype=bool)])
            self.__dict__["_dropped_table"] = table
        return table[layout]

    def keep_node(self, node: fx.Node, layout: np.ndarray) -> np.ndarray:
        """Keep of a node's value, including the position drops of a site-group chain."""
        keep = self.keep_layout(layout)
        g = self.chain_group.get(node)
        if g is not None:
            pos = self.position_keep(g)
            shape = [1] * keep.ndim
            shape[1] = len(pos)
            keep = keep & pos.reshape(shape)
        return keep

    def position_keep(self, g: Group) -> np.ndarray:
        keep = np.ones(g.width, dtype=bool)
        keep[list(self.site_drops.get(g.id, ()))] = False
        return keep

    def site_keep(self, site: Site) -> np.ndarray:
        """Kept positions at a mask site: its classes AND its site group's positions."""
        keep = self.keep_layout(site.atoms)
        g = self.site_group_of.get(id(site))
        if g is not None:
            keep = keep & self.position_keep(g)
        return keep

    def source_keep(self, g: Group) -> np.ndarray:
        """Keep of the tensor a site group reads (its classes only)."""
        lay = self.flow.layouts[g.source]
        return self.keep_layout(along(lay, 1, g.width))
