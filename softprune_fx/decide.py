"""The budget decision: per-group kept counts that land on a FLOPs cut.

Per group the candidate kept counts are at least ``min_width`` (and the frozen count),
and multiples of the rounding step or the full width; a group in front of or behind a
grouped conv also keeps a multiple of its conv groups, the same count in every block.
From the hard-rule set the search steps one group at a time, picking the step that loses
the least value per FLOP saved (or, when the cut is too deep, gains the most value per
FLOP added), until the cut is within ``tol`` of the target. When rounding makes that
impossible, rounding is given up on the fewest groups, and the result says which.

A group's value has diminishing returns: ``W_g * log(S_g)``, S_g the summed score of its
kept channels. Why: with a linear value (score lost per FLOP) and the near-equal scores
that SCP's saturated ``1 - pi`` and untrained BN statistics give, the search cuts the
groups with the most FLOPs per channel to the floor (ResNet-50's early 56x56 layers to 16
channels), and thin layers run far below the throughput of wide ones. W_g is the FLOPs
of the group's layers in the model cut uniformly to the target, which makes "the same
kept fraction in every group" the optimum when scores are equal. Only scores relative to
the rest of their group count: a group whose channels SCP calls dead (low ``1 - pi``)
loses them cheaply, so it is cut further, and low-scored channels go first.

Example::

    decision = decide(cg, index, cost, scores, keep0, ratio=0.4)
    decision.drop, decision.achieved, decision.rounding_dropped
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from softprune_fx.passes.errors import BudgetError
from networkx.utils import UnionFind

from softprune_fx.passes.flow import Balance, Grid, NonEmpty

from .cost import CostModel
from .index import ChannelIndex

MAX_STEPS = 100000


def rounding_step(width: int, round_to) -> int:
    if round_to is None or round_to == "none":
        return 1
    if round_to == "auto":
        return 16 if width >= 64 else 8 if width > 16 else 1
    return max(1, int(round_to))


def min_count(width: int, min_width) -> int:
    if isinstance(min_width, float) and 0 < min_width < 1:
        return max(1, math.ceil(min_width * width))
    return max(1, int(min_width or 1))


@dataclass
class Decision:
    keep: np.ndarray
    drop: dict
    achieved: float
    counts: dict = field(default_factory=dict)
    rounding_dropped: list = field(default_factory=list)


class _Group:
    """One decision unit: a group, or groups a channel shuffle ties column by column.

    Its channels are kept in *units* (a shuffled column, else one channel), best unit
    first; per conv block when a grouped conv balances it. Counts are in units.
    """

    def __init__(self, gid, ids, units, scores, frozen, blocks, step, lower):
        self.id, self.ids, self.units = gid, ids, units
        self.blocks = blocks            # block of each unit (balanced groups) or None
        nb = 1 if blocks is None else int(blocks.max()) + 1
        self.nb = nb
        self.step = math.lcm(step, nb)
        self.lower = lower
        unit_scores = np.array([np.inf if frozen[u].any() else scores[u].sum() for u in units])
        self.order = np.argsort(-unit_scores, kind="stable")       # best first
        if blocks is not None:
            self.block_order = [self.order[blocks[self.order] == b] for b in range(nb)]
        self.n_frozen = int(np.isinf(unit_scores).sum())
        self._kept: dict[int, np.ndarray] = {}

    @property
    def width(self) -> int:
        return len(self.units)

    def allowed(self) -> list[int]:
        lo = max(self.lower, self.n_frozen, self.nb)
        ks = [k for k in range(lo, self.width + 1) if k % self.step == 0 or k == self.width]
        return ks or [self.width]

    def kept(self, count: int) -> np.ndarray:
        """Flat ids kept at ``count`` units: the best ones (per block when balanced)."""
        cached = self._kept.get(count)
        if cached is None:
            cached = self._kept[count] = self._select(count)
        return cached

    def _select(self, count: int) -> np.ndarray:
        if self.blocks is None:
            chosen = self.order[:count]
        else:
            per = count // self.nb
            chosen = np.concatenate([o[:per] for o in self.block_order])
        return np.concatenate([self.units[u] for u in chosen]) if len(chosen) else np.zeros(0, np.int64)


def _shuffle_units(cg, index: ChannelIndex) -> UnionFind:
    """Flat channels a channel shuffle keeps or drops together (one grid column)."""
    uf = UnionFind()
    for c in cg.constraints:
        if isinstance(c, Grid):
            flat = index.atom_ids(c.layout, frozen=True)
            col_axis = [d for d in range(flat.ndim) if flat.shape[d] > 1][-1]
            for j in range(flat.shape[col_axis]):
                col = np.take(flat, j, axis=col_axis).reshape(-1)
                col = col[col >= 0]
                if len(col) > 1:
                    uf.union(*col.tolist())
    return uf


def _decision_groups(cg, index: ChannelIndex, scores, min_width, round_to) -> list[_Group]:
    """Prunable groups, merged where a shuffle ties them, as decision groups."""
    prunable = [g for g in cg.groups if g.prunable]
    units_uf = _shuffle_units(cg, index)
    group_uf = UnionFind([g.id for g in prunable])
    group_of = {}
    for g in prunable:
        for f in index.ids(g.id).tolist():
            group_of[f] = g.id
    for f in list(units_uf.parents):
        lead = units_uf[f]
        if f in group_of and lead in group_of:
            group_uf.union(group_of[f], group_of[lead])
    out = []
    for members in group_uf.to_sets():
        gs = [g for g in prunable if g.id in members]
        ids = np.concatenate([index.ids(g.id) for g in gs])
        classes: dict[int, list[int]] = {}
        for f in ids.tolist():
            classes.setdefault(units_uf[f] if f in units_uf.parents else f, []).append(f)
        units = [np.array(u) for u in classes.values()]
        per_unit = {g.id: g.width / len(units) for g in gs}
        step, lower = 1, 1
        uniform = all(float(r).is_integer() and r >= 1 for r in per_unit.values())
        for g in gs:
            r = int(per_unit[g.id]) if uniform else 1
            s = rounding_step(g.width, round_to) if uniform else 1
            step = math.lcm(step, s // math.gcd(s, r))
            lower = max(lower, math.ceil(min_count(g.width, min_width) / max(r, 1)))
        blocks = _balanced_blocks(cg, index, gs[0].id) if len(gs) == 1 and len(units) == len(ids) else None
        out.append(_Group(gs[0].id, ids, units, np.asarray(scores), index.frozen, blocks, step, lower))
    return sorted(out, key=lambda grp: index.offsets[grp.id])


def _balanced_blocks(cg, index: ChannelIndex, gid: str) -> np.ndarray | None:
    """Block of every channel of a group that a grouped conv splits into blocks."""
    ids = index.ids(gid)
    for c in cg.constraints:
        if not isinstance(c, Balance):
            continue
        flat = index.atom_ids(c.atoms)
        if c.site is not None:
            _, sg = index.site_ids(c.site)
            if (sg >= 0).any() and np.isin(sg, ids).all():
                flat = sg
        if (flat >= 0).any() and np.isin(flat[flat >= 0], ids).all() and np.isin(ids, flat).all():
            blocks = np.full(len(ids), -1)
            per = len(flat) // c.blocks
            for p, f in enumerate(flat):
                if f >= 0:
                    blocks[f - ids[0]] = p // per
            if (blocks >= 0).all():
                return blocks
    return None


def decide(cg, index: ChannelIndex, cost: CostModel, scores: np.ndarray, keep0: np.ndarray, ratio: float, *,
           min_width=1, round_to="auto", tol: float = 0.01) -> Decision:
    """Kept channels per group meeting ``ratio`` within ``tol`` (see the module doc)."""
    groups = _decision_groups(cg, index, scores, min_width, round_to)
    counts = {}
    for grp in groups:
        hard = sum(1 for u in grp.units if np.asarray(keep0)[u].all())
        counts[grp.id] = min((k for k in grp.allowed() if k >= hard), default=grp.width)
    balances = _balances(cg, index)
    search = _Search(groups, counts, cost, scores, index.size, _nonempty(cg, index, balances), balances,
                     index.frozen)
    rounding_dropped = search.run(ratio, tol)
    keep = search.keep()
    return Decision(keep, index.drop_from_keep(keep), cost.ratio(keep), dict(search.counts), rounding_dropped)


def _balances(cg, index: ChannelIndex) -> list[tuple[np.ndarray, np.ndarray]]:
    """(class ids, conv block per position) of every grouped conv's input or output whose
    positions are all channel classes (site-group balances are left to ``legalize``)."""
    out = []
    for c in cg.constraints:
        if isinstance(c, Balance):
            flat = index.atom_ids(c.atoms)
            if (flat >= 0).all():
                out.append((flat, np.arange(len(flat)) // max(1, len(flat) // c.blocks)))
    return out


def _nonempty(cg, index: ChannelIndex, balances: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(class ids, site-group ids, conv block) per position of every tensor that must keep a
    channel. The block is that of a grouped conv (``balances``) reading exactly these
    positions (else 0): it keeps the same count in every block, so every block must keep one."""
    out = []
    for c in cg.constraints:
        if isinstance(c, NonEmpty):
            cls, sg = index.site_ids(c.site) if c.site is not None else (index.atom_ids(c.atoms), None)
            if sg is None:
                sg = np.full(len(cls), -1, dtype=np.int64)
            if (cls >= 0).all() or (sg >= 0).any():
                block = np.zeros(len(cls), dtype=np.int64)
                for flat, blocks in balances:
                    if len(flat) == len(cls) and (flat >= 0).all() and set(flat.tolist()) == set(cls.tolist()):
                        where = {f: b for f, b in zip(flat.tolist(), blocks.tolist())}
                        block = np.array([where[f] for f in cls.tolist()], dtype=np.int64)
                        break
                out.append((cls, sg, block))
    return out


class _Search:
    def __init__(self, groups, counts, cost: CostModel, scores, size, nonempty=(), balances=(), frozen=None):
        self.nonempty, self.balances = list(nonempty), list(balances)
        self.frozen = np.zeros(size, bool) if frozen is None else np.asarray(frozen, bool)
        self.groups, self.counts, self.cost = groups, counts, cost
        self.scores = np.clip(np.where(np.isfinite(scores), scores, 0.0), 0.0, None)
        self.size = size
        self.weight: dict[str, float] = {}

    def _weigh(self, ratio: float) -> None:
        """W_g: the FLOPs of each group's layers when every group keeps the same fraction f,
        f chosen (by bisection on the soft cost model) so that the uniform cut is ``ratio``."""
        def uniform(f: float) -> np.ndarray:
            keep = np.ones(self.size)
            for grp in self.groups:
                keep[grp.ids] = f
            return keep
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.cost.ratio(uniform(mid)) < ratio else (mid, hi)
        f = max(hi, 1e-3)
        marg = self.cost.marginal(uniform(f))
        self.weight = {grp.id: f * float(marg[grp.ids].sum()) for grp in self.groups}

    def keep(self, *steps: tuple) -> np.ndarray:
        """The keep vector at the current counts, with ``(group, count)`` steps applied."""
        counts = {**self.counts, **{grp.id: count for grp, count in steps}}
        keep = np.ones(self.size, dtype=bool)
        for grp in self.groups:
            count = counts[grp.id]
            keep[grp.ids] = False
            keep[grp.kept(count)] = True
        return self.balance(self.repair(keep))

    def balance(self, keep: np.ndarray) -> np.ndarray:
        """What ``legalize`` will do to a grouped conv whose blocks keep different counts
        (a split piece read by a grouped conv, in a group the counts treat as one): drop
        each block's lowest-scored channels down to the smallest count, so the search
        prices the keep set that will really be cut."""
        for _ in range(len(self.balances) + 1):
            changed = False
            for flat, blocks in self.balances:
                counts = np.bincount(blocks, weights=keep[flat])
                target = counts.min()
                for b in np.flatnonzero(counts > target):
                    pos = flat[(blocks == b) & keep[flat] & ~self.frozen[flat]]
                    drop = pos[np.argsort(self.scores[pos], kind="stable")][:int(counts[b] - target)]
                    keep[drop] = False
                    changed |= len(drop) > 0
            if not changed:
                break
        return keep

    def repair(self, keep: np.ndarray) -> np.ndarray:
        """Keep the best position of any tensor the counts would empty (of each conv block
        of it, where a grouped conv reads it): a site group and the group it reads may
        each keep channels, but not the same ones."""
        ext = np.append(keep, True)
        score = np.append(self.scores, np.inf)
        for cls, sg, block in self.nonempty:
            for b in np.unique(block):
                pos = np.flatnonzero(block == b)
                if (ext[cls[pos]] & ext[sg[pos]]).any() or not len(pos):
                    continue
                best = pos[int(np.argmax(score[cls[pos]] + score[sg[pos]] + np.where(ext[cls[pos]], 1e6, 0.0)))]
                ext[cls[best]] = ext[sg[best]] = True
        return ext[:-1]

    def _value_change(self, grp: _Group, hi: np.ndarray, lo: np.ndarray) -> float:
        """Value lost going from kept set ``hi`` down to ``lo``: ``W_g * log(S(hi) / S(lo))``."""
        s_hi, s_lo = self.scores[hi].sum(), self.scores[lo].sum()
        if s_hi <= 0:
            return 0.0
        return self.weight[grp.id] * math.log(s_hi / max(s_lo, 1e-12 * s_hi))

    def _moves(self, down: bool):
        """Candidate single-group steps with their value change per FLOP."""
        keep = self.keep()
        marg = self.cost.marginal(keep)
        moves = []
        for grp in self.groups:
            ks = grp.allowed()
            cur = self.counts[grp.id]
            nxt = max((k for k in ks if k < cur), default=None) if down else min((k for k in ks if k > cur), default=None)
            if nxt is None:
                continue
            hi, lo = grp.kept(max(cur, nxt)), grp.kept(min(cur, nxt))
            dflops = float(marg[np.setdiff1d(hi, lo)].sum())
            dvalue = self._value_change(grp, hi, lo)
            if dflops > 0:
                moves.append((dvalue / dflops if down else -dvalue / dflops, grp, nxt))
        return sorted(moves, key=lambda m: m[0])

    def _closest(self, cut: float, ratio: float, width: int = 20) -> bool:
        """When no single step lands in the window (tiny models, whose channels are each a
        big share of the FLOPs): take the single step, or the pair of one step up in one
        group and one down in another (the ``width`` best of each), that lands nearest
        ``ratio``, if it is nearer than ``cut``. Says whether it took one."""
        up = [(grp, nxt) for _, grp, nxt in self._moves(False)[:width]]
        down = [(grp, nxt) for _, grp, nxt in self._moves(True)[:width]]
        options = [(s,) for s in up + down] + [(a, b) for a in up for b in down if a[0] is not b[0]]
        best, best_gap = None, abs(cut - ratio)
        for steps in options:
            gap = abs(self.cost.ratio(self.keep(*steps)) - ratio)
            if gap < best_gap - 1e-12:
                best, best_gap = steps, gap
        for grp, count in best or ():
            self.counts[grp.id] = count
        return best is not None

    def run(self, ratio: float, tol: float) -> list[str]:
        rounding_dropped: list[str] = []
        self._weigh(ratio)
        for _ in range(MAX_STEPS):
            cut = self.cost.ratio(self.keep())
            if abs(cut - ratio) <= tol:
                return rounding_dropped
            down = cut < ratio
            moves = self._moves(down)
            if not moves:
                if down:
                    raise BudgetError(f"no legal keep set reaches a {ratio:.1%} FLOPs cut; the largest "
                                      f"reachable cut is {cut:.1%}")
                return rounding_dropped
            landed = None
            for _, grp, nxt in moves:
                new = self.cost.ratio(self.keep((grp, nxt)))
                if (new <= ratio + tol) if down else (new >= ratio - tol):
                    landed = (grp, nxt)
                    break
            if landed is None:  # every step jumps over the window: give up rounding on one group
                rounded = [grp for _, grp, _ in moves if grp.step > max(1, grp.nb)]
                if not rounded:  # the window is narrower than any single step: get closer
                    if self._closest(cut, ratio):
                        continue  # each such step narrows the gap, so this ends
                    return rounding_dropped
                rounded[0].step = max(1, rounded[0].nb)
                rounding_dropped.append(rounded[0].id)
                continue
            self.counts[landed[0].id] = landed[1]
        return rounding_dropped
