"""The one constraint engine: Balance, Grid and NonEmpty over one flat channel space.

**The flat space** (``Space``, which ``softprune_fx.index.ChannelIndex`` is): every channel
of every group gets one id, group by group in ``groups`` order (channel i of group g is
``offsets[g] + i``); site groups come last in ``groups``, so their positions follow the
coupling groups' classes. A *keep vector* is a bool array over this space; frozen
channels are always True.

Every constraint record of the flow (``flow_types.Balance/Grid/NonEmpty``) is compiled
to *positions*: a position is kept iff its class channel ``a`` and its site-group channel
``b`` are both kept (-1 for either part means "always kept": a sentinel, a frozen channel,
or no site group).

- ``GridRule`` (a channel shuffle or a view splitting channels): the channels of one grid
  column are kept whole or dropped whole; the engine merges them into one *unit*, and a
  column holding an always-kept element is a unit that must stay.
- ``BalanceRule`` (a grouped conv, both sides; GroupNorm when pruned inexactly): positions
  in ``nb`` equal blocks keep the same count, at least one, in every block.
- ``NonEmptyRule`` (a split piece, a conv's input or output, every group): one position stays.

Each rule checks a keep vector, repairs one towards a score (``repair``: the least change
that satisfies it, others held fixed) and enumerates its legal steps (``steps``).
``legalize`` (the nearest legal drop) and the budget decision both use ``Constraints``.

Example::

    engine = Constraints.build(flow, groups)
    engine.legal(keep); engine.violations(keep); engine.unit_of[flat_id]
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from networkx.utils import UnionFind

from .atoms import carrying_axes
from .flow_types import Balance, Grid, NonEmpty


class Space:
    """The flat channel numbering of ``groups`` (see the module doc)."""

    def __init__(self, flow, groups):
        self.groups = list(groups)
        self.by_id = {g.id: g for g in self.groups}
        self.offsets: dict[str, int] = {}
        widths = np.array([g.width for g in self.groups], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.size = int(starts[-1])
        self.frozen = np.zeros(self.size, dtype=bool)
        self.group_index = np.repeat(np.arange(len(self.groups)), widths)   # group of each flat id
        self.local = np.arange(self.size) - starts[self.group_index] if self.size else np.zeros(0, np.int64)
        self._table = flow.table
        self._flat_of_root = np.full(max(len(self._table), 1), -1, dtype=np.int64)
        for k, g in enumerate(self.groups):
            self.offsets[g.id] = int(starts[k])
            if g.frozen_channels:
                self.frozen[starts[k] + np.asarray(g.frozen_channels, dtype=np.int64)] = True
            if not g.is_site_group:
                self._flat_of_root[np.asarray(g.classes, dtype=np.int64)] = starts[k] + np.arange(g.width)
        self.site_group = {id(g.site): g for g in self.groups if g.site is not None}

    @property
    def group_of(self) -> list[tuple[str, int]]:
        return [(self.groups[k].id, int(i)) for k, i in zip(self.group_index, self.local)]

    def ids(self, gid: str) -> np.ndarray:
        start = self.offsets[gid]
        return np.arange(start, start + self.by_id[gid].width)

    def atom_ids(self, atoms, frozen: bool = False) -> np.ndarray:
        """Flat id of each atom's class: -1 for sentinels, and for frozen channels unless
        ``frozen`` (they are always kept, so masks, costs and rules treat them as constants)."""
        atoms = np.asarray(atoms, dtype=np.int64)
        flat = np.where(atoms >= 0, self._flat_of_root[np.maximum(self._table.find(atoms), 0)], -1)
        if not frozen:
            flat = np.where((flat >= 0) & self.frozen[np.maximum(flat, 0)], -1, flat)
        return flat

    def site_ids(self, site) -> tuple[np.ndarray, np.ndarray]:
        """Per position of a mask site: (class flat id, site-group flat id), -1 = none."""
        cls = self.atom_ids(site.atoms)
        g = self.site_group.get(id(site))
        if g is None:
            return cls, np.full(len(site.atoms), -1, dtype=np.int64)
        sg = self.ids(g.id)
        return cls, np.where(self.frozen[sg], -1, sg)

    def drop_from_keep(self, keep) -> dict[str, list[int]]:
        flat = np.flatnonzero(~np.asarray(keep, dtype=bool) & ~self.frozen)
        drop: dict[str, list[int]] = {}
        for k, i in zip(self.group_index[flat].tolist(), self.local[flat].tolist()):
            drop.setdefault(self.groups[k].id, []).append(i)
        return drop

    def keep_from_drop(self, drop: dict | None) -> np.ndarray:
        keep = np.ones(self.size, dtype=bool)
        for gid, indices in (drop or {}).items():
            keep[self.offsets[gid] + np.asarray(list(indices), dtype=np.int64)] = False
        return keep


def _ext(keep: np.ndarray) -> np.ndarray:
    """``keep`` with a trailing True, so that position part -1 reads "always kept"."""
    return np.append(np.asarray(keep, dtype=bool), True)


@dataclass
class NonEmptyRule:
    a: np.ndarray           # class flat id per position (-1: always kept)
    b: np.ndarray           # site-group flat id per position (-1: none)
    where: str

    def kept(self, keep: np.ndarray) -> np.ndarray:
        ext = _ext(keep)
        return ext[self.a] & ext[self.b]

    @staticmethod
    def holds(alive):
        """The rule on kept-position counts (any shape): one or more stays."""
        return np.asarray(alive) > 0

    def check(self, keep: np.ndarray) -> str | None:
        if not self.holds(self.kept(keep).sum()):
            return f"the drop would remove every channel of the {self.where}"
        return None

    def repair(self, keep: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Take back the best-scored position (fewest channels to take back first)."""
        if self.check(keep) is None:
            return keep
        ext, s = _ext(keep), np.append(score, np.inf)
        back = (~ext[self.a]).astype(int) + (~ext[self.b]).astype(int)
        best = np.lexsort((-(s[self.a] + s[self.b]), back))[0]
        out = keep.copy()
        for f in (self.a[best], self.b[best]):
            if f >= 0:
                out[f] = True
        return out

    def steps(self, n: int) -> range:
        """Legal kept counts of ``n`` positions: one or more."""
        return range(1, n + 1)


@dataclass
class BalanceRule:
    a: np.ndarray
    b: np.ndarray
    block: np.ndarray       # conv block of each position
    nb: int
    where: str

    def counts(self, keep: np.ndarray) -> np.ndarray:
        ext = _ext(keep)
        return np.bincount(self.block, weights=ext[self.a] & ext[self.b], minlength=self.nb)

    @staticmethod
    def holds(counts, lo=None, hi=None):
        """The rule on per-block kept counts (blocks on the last axis), or on their
        minimum ``lo`` and maximum ``hi``: every block alike, one or more each."""
        if lo is None:
            lo, hi = np.min(counts, -1), np.max(counts, -1)
        return (lo == hi) & (hi > 0)

    def check(self, keep: np.ndarray) -> str | None:
        counts = self.counts(keep)
        if self.holds(counts):
            return None
        if counts.max() == 0:
            return f"{self.where}: the drop would empty every conv group"
        if counts.min() != counts.max():
            return (f"{self.where}: conv groups would keep different channel counts "
                    f"{sorted({int(c) for c in counts})}; legalize() balances them")
        return None

    def repair(self, keep: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Bring every block to the common count that changes the fewest positions (ties:
        the lower count), dropping a block's lowest-scored positions or taking back its
        best-scored ones; frozen and sentinel positions stay."""
        if self.check(keep) is None:
            return keep
        ext, s = _ext(keep), np.append(score, np.inf)
        fixed = (self.a < 0) & (self.b < 0)
        counts = self.counts(keep)
        floor = np.bincount(self.block, weights=fixed, minlength=self.nb)
        size = np.bincount(self.block, minlength=self.nb)
        lo, hi = int(max(1, floor.max())), int(size.min())
        if lo > hi:
            return np.ones_like(keep)
        cands = np.arange(lo, hi + 1)
        target = int(cands[np.argmin(np.abs(counts[None, :] - cands[:, None]).sum(1))])
        out = ext.copy()
        for blk in range(self.nb):
            pos = np.flatnonzero((self.block == blk) & ~fixed)
            kept = out[self.a[pos]] & out[self.b[pos]]
            val = s[self.a[pos]] + s[self.b[pos]]
            if counts[blk] > target:
                drop = pos[kept][np.argsort(val[kept], kind="stable")][:int(counts[blk] - target)]
                part = np.where(self.b[drop] >= 0, self.b[drop], self.a[drop])
                out[part] = False
            elif counts[blk] < target:
                back = pos[~kept][np.argsort(-val[~kept], kind="stable")][:int(target - counts[blk])]
                out[self.a[back]] = out[self.b[back]] = True
        out[-1] = True
        return out[:-1]

    def steps(self, n: int) -> range:
        """Legal kept counts of the ``n`` positions: every block alike, one or more each."""
        return range(self.nb, n + 1, self.nb)


@dataclass
class GridRule:
    columns: list[np.ndarray]   # flat ids per column (-1: always kept)
    where: str

    def __post_init__(self):
        self._cols = np.stack(self.columns) if self.columns else np.zeros((0, 0), np.int64)

    def check(self, keep: np.ndarray) -> str | None:
        ext = _ext(keep)
        for col in self.columns:
            k = ext[col]
            if k.any() and not k.all():
                return f"{self.where}: a shuffled channel column is only partly dropped; legalize() drops it whole"
        return None

    def repair(self, keep: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Each partly dropped column goes the way most of its channels went (kept when it
        holds an always-kept element or on a tie)."""
        cols = self._cols
        out = _ext(keep)
        k = out[cols]
        partial = k.any(1) & ~k.all(1)
        if partial.any():
            whole = (cols < 0).any(1) | (2 * k.sum(1) >= cols.shape[1])
            out[cols[partial]] = whole[partial, None]
            out[-1] = True
        return out[:-1]

    def steps(self, n: int) -> list[np.ndarray]:
        """The legal moves: whole columns."""
        return [c[c >= 0] for c in self.columns]


def _grid_columns(space: Space, layout) -> list[np.ndarray]:
    flat = space.atom_ids(layout)
    axes = carrying_axes(np.asarray(layout))
    if not axes:
        return []
    col_axis = axes[-1]
    return [np.take(flat, j, axis=col_axis).reshape(-1) for j in range(flat.shape[col_axis])]


def _positions(space: Space, atoms, site) -> tuple[np.ndarray, np.ndarray]:
    if site is not None:
        return space.site_ids(site)
    a = space.atom_ids(atoms)
    return a, np.full(len(a), -1, dtype=np.int64)


class Constraints:
    """Every rule of a flow over its ``Space``, with Grid columns merged into units and
    vectorised checks (one bincount for all balances, one for all non-empties)."""

    def __init__(self, space: Space, records: list):
        self.space = space
        self.grids, self.balances, self.nonempty = [], [], []
        for c in records:
            if isinstance(c, Grid):
                self.grids.append(GridRule(_grid_columns(space, c.layout), c.where))
            elif isinstance(c, Balance):
                a, b = _positions(space, c.atoms, c.site)
                per = max(1, len(a) // c.blocks)
                self.balances.append(BalanceRule(a, b, np.arange(len(a)) // per, c.blocks, c.where))
            elif isinstance(c, NonEmpty):
                a, b = _positions(space, c.atoms, c.site)
                if len(a):
                    self.nonempty.append(NonEmptyRule(a, b, c.where))
        for g in space.groups:
            if not g.is_site_group and g.width:
                ids = space.ids(g.id)
                a = np.where(space.frozen[ids], -1, ids)
                self.nonempty.append(NonEmptyRule(a, np.full(len(a), -1, np.int64), f"group {g.id!r}"))
        self._units()
        self._pack()

    @classmethod
    def build(cls, flow, groups, space: Space | None = None) -> "Constraints":
        """The engine of ``flow`` (cached per flow object while it lives)."""
        key = id(flow)
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is flow and hit[1] == (len(flow.constraints), len(groups)):
            return hit[2]
        engine = cls(space or Space(flow, groups), flow.constraints)
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = (weakref.ref(flow), (len(flow.constraints), len(groups)), engine)
        return engine

    # ------------------------------------------------------------------ compile
    def _units(self) -> None:
        """unit_of[flat]: the Grid unit of each channel; ``forced``: units that must stay."""
        n = self.space.size
        uf = UnionFind()
        forced_flat = []
        for g in self.grids:
            for col in g.columns:
                free = col[col >= 0].tolist()
                if len(free) > 1:
                    uf.union(*free)
                if (col < 0).any() and free:
                    forced_flat.append(free[0])
        lead = np.arange(n)
        for f in list(uf.parents):
            lead[f] = uf[f]
        _, unit = np.unique(lead, return_inverse=True)
        self.n_units = int(unit.max()) + 1 if n else 0
        self.unit_of = np.append(unit, -1).astype(np.int64)     # unit_of[-1] = -1: const
        self.unit_size = np.bincount(unit, minlength=self.n_units)
        self.forced = np.zeros(self.n_units, dtype=bool)
        self.forced[self.unit_of[np.asarray(forced_flat, dtype=np.int64)]] = True
        self.forced[self.unit_of[:-1][self.space.frozen]] = True       # frozen channels stay
        self._unit_order = np.argsort(unit, kind="stable")

    @property
    def unit_members(self) -> list[np.ndarray]:
        """Flat channels per unit; on request (45 ms on DenseNet-121; the decision never asks)."""
        if not self.n_units:
            return []
        return np.split(self._unit_order, np.cumsum(self.unit_size)[:-1])

    def _pack(self) -> None:
        """Concatenated positions of all balances / non-empties, for one-shot checks."""
        def cat(parts, dtype=np.int64):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        bal = self.balances
        self._ba, self._bb = cat([r.a for r in bal]), cat([r.b for r in bal])
        base = np.cumsum([0] + [r.nb for r in bal])
        self._bblock = cat([r.block + base[k] for k, r in enumerate(bal)])
        self._bstart = base[:-1].astype(np.int64)
        ne = self.nonempty
        self._na, self._nb = cat([r.a for r in ne]), cat([r.b for r in ne])
        # segment starts of the non-empty rules with positions, for one logical_or.reduceat
        # (a bincount with weights over all positions cost most of a check)
        sizes = np.array([len(r.a) for r in ne], dtype=np.int64)
        self._nstart = (np.cumsum(sizes) - sizes)[sizes > 0]
        self._nhas = np.flatnonzero(sizes > 0)
        # kept count per unit: the keep vector itself when every unit is one channel
        self._unit_identity = self.n_units == len(self.unit_of) - 1 and np.array_equal(
            self.unit_of[:-1], np.arange(self.n_units))

    def rules(self) -> list:
        return [*self.grids, *self.balances, *self.nonempty]

    # ------------------------------------------------------------------ checks
    def violations(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(units partly kept or forced but dropped, violated balance indices, violated
        non-empty indices)."""
        keep = np.asarray(keep, dtype=bool)
        ext = _ext(keep)
        kc = keep if self._unit_identity else np.bincount(self.unit_of[:-1], weights=keep, minlength=self.n_units)
        bad_units = np.flatnonzero(((kc > 0) & (kc < self.unit_size)) | (self.forced & (kc < self.unit_size)))
        bad_bal = np.zeros(0, np.int64)
        if len(self.balances):
            counts = np.bincount(self._bblock, weights=ext[self._ba] & ext[self._bb],
                                 minlength=int(self._bstart[-1] + self.balances[-1].nb))
            lo, hi = np.minimum.reduceat(counts, self._bstart), np.maximum.reduceat(counts, self._bstart)
            bad_bal = np.flatnonzero(~BalanceRule.holds(None, lo, hi))
        bad_ne = np.zeros(0, np.int64)
        if len(self.nonempty):
            alive = np.zeros(len(self.nonempty), bool)
            if len(self._nstart):
                alive[self._nhas] = np.logical_or.reduceat(ext[self._na] & ext[self._nb], self._nstart)
            bad_ne = np.flatnonzero(~NonEmptyRule.holds(alive))
        return bad_units, bad_bal, bad_ne

    def legal(self, keep: np.ndarray) -> bool:
        return not any(len(v) for v in self.violations(keep))

    def explain(self, keep: np.ndarray) -> str | None:
        """The first reason ``keep`` is illegal (None when legal): group emptiness first."""
        bad_units, bad_bal, bad_ne = self.violations(keep)
        for k in bad_ne:
            if self.nonempty[k].where.startswith("group "):
                return f"the drop would remove every channel of {self.nonempty[k].where}"
        for rule in [*self.grids, *(self.balances[k] for k in bad_bal), *(self.nonempty[k] for k in bad_ne)]:
            msg = rule.check(keep)
            if msg is not None:
                return msg
        if len(bad_units):
            return "a shuffled channel column is only partly dropped; legalize() drops it whole"
        return None

    # ------------------------------------------------------------------ for the decision
    def blocks_of(self, ids: np.ndarray) -> np.ndarray | None:
        """Conv block of every flat id in ``ids`` when one balance covers exactly them
        (through its class or its site-group side), else None."""
        ids = np.asarray(ids)
        order = np.sort(ids)
        for r in self.balances:
            for side in (r.b, r.a):
                if len(side) == len(ids) and (side >= 0).all() and np.array_equal(np.sort(side), order):
                    blocks = np.empty(len(ids), dtype=np.int64)
                    blocks[np.searchsorted(order, side)] = r.block
                    return blocks[np.searchsorted(order, ids)]
        return None


_CACHE: dict[int, tuple] = {}
