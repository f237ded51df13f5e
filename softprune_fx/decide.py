"""The budget decision: per-group kept counts that land on a FLOPs cut.

Per group the candidate kept counts are at least ``min_width`` (and the frozen count),
and multiples of the rounding step or the full width; a group a grouped conv balances
also keeps a multiple of its conv groups, the same count in every block, and groups a
channel shuffle ties keep whole columns (both from the constraint engine,
``softprune_fx.passes.constraints``). From the hard-rule set the search steps groups by
the least value lost per FLOP saved (or, when the cut is too deep, the most value gained
per FLOP added) until the cut is within ``tol`` of the target. When rounding makes that
impossible, rounding is given up on the fewest groups, and the result says which; when
no single step lands, a step up in one group and one down in another are combined.

A group's value has diminishing returns: ``W_g * log(S_g)``, S_g the summed score of its
kept channels. Why: with a linear value (score lost per FLOP) and the near-equal scores
that SCP's saturated ``1 - pi`` and untrained BN statistics give, the search cuts the
groups with the most FLOPs per channel to the floor (ResNet-50's early 56x56 layers to 16
channels), and thin layers run far below the throughput of wide ones. W_g is the FLOPs
of the group's layers in the model cut uniformly to the target, which makes "the same
kept fraction in every group" the optimum when scores are equal. Only scores relative to
the rest of their group count: a group whose channels SCP calls dead (low ``1 - pi``)
loses them cheaply, so it is cut further, and low-scored channels go first.

Speed: every step of every group is priced at once (numpy over one array of candidate
counts), from one ``cost.marginal`` per round; far from the target a round takes the
best-priced steps worth half the remaining FLOPs gap (first-order prices go stale as
neighbours shrink, so each round re-prices), near it one exact step at a time. The keep
set of any counts is legalized by the engine (``nearest``), so the search prices what
will be cut. ``cost`` is any object with the CostModel protocol: ``total0``,
``flops(keep)``, ``ratio(keep)``, ``marginal(keep)``.

Example::

    decision = decide(cg, index, cost, scores, keep0, ratio=0.4)
    decision.drop, decision.achieved, decision.rounding_dropped
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from networkx.utils import UnionFind

from softprune_fx.passes.errors import BudgetError
from softprune_fx.passes.legalize import nearest

from .cost import CostModel
from .index import ChannelIndex

MAX_ROUNDS = 100000
BULK = 0.5          # share of the FLOPs gap one round may close on first-order prices
EXACT_SPAN = 3.0    # gaps under this many best steps are closed one exact step at a time


def rounding_step(width: int, round_to) -> int:
    """The kept-count step of a ``width``-wide group (the latency model may refine it)."""
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


@dataclass
class _Group:
    """One decision unit: a group, or groups a channel shuffle ties column by column.
    Counts are in engine units (a shuffled column, else one channel), kept best first
    (per conv block when a grouped conv balances it: ``seq`` interleaves the blocks)."""

    id: str
    flat: np.ndarray        # flat ids of its channels
    rank: np.ndarray        # per flat id: position of its unit in ``seq`` order
    unit_score: np.ndarray  # clipped score of each unit, in seq order
    n_fixed: int            # units that always stay (frozen or tied to a frozen channel)
    nb: int
    step: int
    lower: int
    points: np.ndarray | None = None    # measured efficient widths (latency), in units

    @property
    def width(self) -> int:
        return len(self.unit_score)

    def allowed(self) -> np.ndarray:
        lo = max(self.lower, self.n_fixed, self.nb)
        ks = np.arange(lo, self.width + 1)
        ks = ks[(ks % self.step == 0) | (ks == self.width)]
        if self.points is not None:
            on = ks[np.isin(ks, self.points) | (ks == self.width)]
            ks = on if len(on) > 1 else ks
        return ks if len(ks) else np.array([self.width])


def _unit_table(index: ChannelIndex, engine, g_ids: list[np.ndarray]):
    """Prunable groups merged where one shuffled column spans several of them."""
    uf = UnionFind(range(len(g_ids)))
    owner: dict[int, int] = {}
    for k, ids in enumerate(g_ids):
        units = engine.unit_of[ids][engine.unit_size[engine.unit_of[ids]] > 1]
        for u in np.unique(units).tolist():
            if u in owner:
                uf.union(owner[u], k)
            else:
                owner[u] = k
    return [sorted(s) for s in uf.to_sets()]


def _decision_groups(cg, index: ChannelIndex, engine, scores, min_width, round_to, points=None) -> list[_Group]:
    prunable = [g for g in cg.groups if g.prunable]
    g_ids = [index.ids(g.id) for g in prunable]
    raw = np.asarray(scores, dtype=float)
    clipped = np.clip(np.where(np.isfinite(raw), raw, 0.0), 0.0, None)
    out = []
    for members in _unit_table(index, engine, g_ids):
        gs = [prunable[k] for k in members]
        flat = np.concatenate([g_ids[k] for k in members])
        units = engine.unit_of[flat]
        if len(units) > 1 and (units[1:] > units[:-1]).all():  # one unit per channel, in order:
            inverse = np.arange(len(units))                     # np.unique's answer, without the sort
        else:
            units, inverse = np.unique(units, return_inverse=True)
        fixed_unit = np.bincount(inverse, weights=index.frozen[flat], minlength=len(units)) > 0
        fixed_unit |= engine.forced[units]
        u_raw = np.bincount(inverse, weights=raw[flat], minlength=len(units))
        u_clip = np.bincount(inverse, weights=clipped[flat], minlength=len(units))
        key = np.where(fixed_unit, np.inf, u_raw)
        n_units = len(units)
        blocks = engine.blocks_of(flat) if len(gs) == 1 and n_units == len(flat) else None
        nb = 1 if blocks is None else int(blocks.max()) + 1
        if blocks is None:
            order = np.argsort(-key, kind="stable")
        else:
            ub = np.empty(n_units, np.int64)
            ub[inverse] = blocks
            within = np.empty(n_units, np.int64)
            for b in range(nb):
                m = np.flatnonzero(ub == b)
                within[m[np.argsort(-key[m], kind="stable")]] = np.arange(len(m))
            order = np.lexsort((ub, within))
        pos = np.empty(n_units, np.int64)
        pos[order] = np.arange(n_units)
        step, lower = 1, 1
        per_unit = {g.id: g.width / n_units for g in gs}
        uniform = all(float(r).is_integer() and r >= 1 for r in per_unit.values())
        for g in gs:
            r = int(per_unit[g.id]) if uniform else 1
            s = rounding_step(g.width, round_to) if uniform else 1
            step = math.lcm(step, s // math.gcd(s, r))
            lower = max(lower, math.ceil(min_count(g.width, min_width) / max(r, 1)))
        pts = points(gs[0].id) if points is not None and len(gs) == 1 and n_units == len(flat) else None
        out.append(_Group(gs[0].id, flat, pos[inverse], u_clip[order], int(fixed_unit.sum()), nb,
                          math.lcm(step, nb), lower, None if pts is None else np.asarray(pts, np.int64)))
    return sorted(out, key=lambda grp: index.offsets[grp.id])


def decide(cg, index: ChannelIndex, cost, scores: np.ndarray, keep0: np.ndarray, ratio: float, *,
           min_width=1, round_to="auto", tol: float = 0.01, points=None) -> Decision:
    """Kept channels per group meeting ``ratio`` within ``tol`` (see the module doc).
    ``points(gid)``: a group's measured efficient widths (the latency model), or None;
    where given, a group's counts are those widths (and the full width), given up like
    rounding when no step lands."""
    engine = index.constraints
    groups = _decision_groups(cg, index, engine, scores, min_width, round_to, points)
    search = _Search(groups, cost, np.asarray(scores, float), index.size, engine)
    hard = search.hard_counts(np.asarray(keep0, bool))
    for grp, h in zip(groups, hard):
        ks = grp.allowed()
        search.counts[grp.id] = int(ks[ks >= h][0]) if (ks >= h).any() else grp.width
    rounding_dropped = search.run(ratio, tol)
    keep = search.keep()
    return Decision(keep, index.drop_from_keep(keep), cost.ratio(keep), dict(search.counts), rounding_dropped)


class _Search:
    def __init__(self, groups: list[_Group], cost, scores: np.ndarray, size: int, engine):
        self.groups, self.cost, self.engine, self.size = groups, cost, engine, size
        self.raw = scores
        self.counts: dict[str, int] = {}
        self.flat = np.concatenate([g.flat for g in groups]) if groups else np.zeros(0, np.int64)
        self.member = np.repeat(np.arange(len(groups)), [len(g.flat) for g in groups])
        self.unit_base = np.concatenate([[0], np.cumsum([g.width for g in groups])]).astype(np.int64)
        self.gpos = np.concatenate([g.rank for g in groups]) + self.unit_base[self.member] if groups else self.flat
        self.rank = np.concatenate([g.rank for g in groups]) if groups else self.flat
        self.weight = np.zeros(len(groups))
        self._tables()

    def _tables(self) -> None:
        """One array of every group's allowed counts (group-major), with S at each count."""
        allowed = [g.allowed() for g in self.groups]
        self.A = np.concatenate(allowed) if allowed else np.zeros(0, np.int64)
        self.G = np.repeat(np.arange(len(self.groups)), [len(a) for a in allowed])
        cum = [np.concatenate([[0.0], np.cumsum(g.unit_score)]) for g in self.groups]
        self.S = np.concatenate([c[a] for c, a in zip(cum, allowed)]) if allowed else np.zeros(0)
        self.pair = np.flatnonzero(self.G[1:] == self.G[:-1]) if len(self.G) else np.zeros(0, np.int64)

    def hard_counts(self, keep0: np.ndarray) -> list[int]:
        """Units each group keeps whole in the hard-rule set."""
        out = []
        for g in self.groups:
            whole = np.bincount(g.rank, weights=~keep0[g.flat], minlength=g.width) == 0
            out.append(int(whole.sum()))
        return out

    def keep(self, *steps: tuple) -> np.ndarray:
        """The legalized keep vector at the current counts, with ``(group, count)`` steps."""
        counts = np.array([self.counts[g.id] for g in self.groups])
        for k, count in steps:
            counts[k] = count
        keep = np.ones(self.size, dtype=bool)
        keep[self.flat] = self.rank < counts[self.member]
        return nearest(self.engine, keep, self.raw)

    def _weigh(self, ratio: float) -> None:
        """W_g: the FLOPs of each group's layers when every group keeps the same fraction f
        that cuts ``ratio`` on the (soft) cost model."""
        def uniform(f: float) -> np.ndarray:
            keep = np.ones(self.size)
            keep[self.flat] = f
            return keep

        def at(f: float) -> float:
            return self.cost.ratio(uniform(f))
        if isinstance(self.cost, CostModel):
            # FLOPs are bilinear in kept counts and each count is affine in f (a site group's
            # positions square it): the cut is a cubic in f, fixed by four evaluations
            fs = np.linspace(0.0, 1.0, 4)
            poly = np.polyfit(fs, [at(f) for f in fs], 3)

            def at(f: float) -> float:  # noqa: F811 - the same function, from its cubic
                return float(np.polyval(poly, f))
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if at(mid) < ratio else (mid, hi)
            if hi - lo < 1e-4:
                break
        f = max(hi, 1e-3)
        marg = self.cost.marginal(uniform(f))
        self.weight = f * np.bincount(self.member, weights=marg[self.flat], minlength=len(self.groups))

    def _steps(self, marg: np.ndarray, down: bool):
        """Every legal step of every group from its current count: (group, new count,
        priority, FLOPs), priorities made monotone along each group's sequence."""
        unit_marg = np.bincount(self.gpos, weights=marg[self.flat], minlength=int(self.unit_base[-1]))
        C = np.concatenate([[0.0], np.cumsum(unit_marg)])
        cm = C[self.unit_base[self.G] + self.A] - C[self.unit_base[self.G]]
        lo, hi = self.pair, self.pair + 1
        grp = self.G[lo]
        cur = np.array([self.counts[g.id] for g in self.groups])[grp]
        ok = (self.A[hi] <= cur) if down else (self.A[lo] >= cur)
        lo, hi, grp = lo[ok], hi[ok], grp[ok]
        dflops = cm[hi] - cm[lo]
        s_hi, s_lo = self.S[hi], self.S[lo]
        with np.errstate(divide="ignore", invalid="ignore"):
            dvalue = np.where(s_hi > 0, self.weight[grp] * np.log(s_hi / np.maximum(s_lo, 1e-12 * s_hi)), 0.0)
            prio = np.where(dflops > 0, (dvalue if down else -dvalue) / dflops, np.inf)
        seq = -lo if down else lo                 # each group's steps in the order they come
        order = np.lexsort((seq, grp))
        lo, hi, grp, prio, dflops = lo[order], hi[order], grp[order], prio[order], dflops[order]
        if len(prio):
            n = len(prio)      # ranks 0..n-1; n marks "never" (no FLOPs), offsets isolate groups
            ranks = np.argsort(np.argsort(prio, kind="stable"), kind="stable")
            ranks[~np.isfinite(prio)] = n
            mono = np.maximum.accumulate(ranks + grp * (n + 1)) - grp * (n + 1)
            keep = mono < n
            lo, hi, grp, prio, dflops, mono = lo[keep], hi[keep], grp[keep], prio[keep], dflops[keep], mono[keep]
        else:
            mono = prio
        new = self.A[lo] if down else self.A[hi]
        first = np.concatenate([[True], grp[1:] != grp[:-1]]) if len(grp) else np.zeros(0, bool)
        return grp, new, prio, mono, dflops, first

    def _bulk(self, steps, gap_flops: float) -> bool:
        """Take the best-priced steps worth ``BULK`` of the gap; False when the gap is too
        small for that (the exact phase takes over)."""
        grp, new, _, mono, dflops, first = steps
        order = np.lexsort((np.arange(len(mono)), mono))
        best = dflops[order[0]]
        if gap_flops < EXACT_SPAN * best:
            return False
        taken = order[np.cumsum(dflops[order]) <= BULK * gap_flops]
        if len(taken) < 2:
            return False
        for k in np.unique(grp[taken]).tolist():
            mine = taken[grp[taken] == k]
            self.counts[self.groups[k].id] = int(new[mine[-1]] if len(mine) else self.counts[self.groups[k].id])
        return True

    def _single(self, marg: np.ndarray, down: bool):
        """Each group's next step, best priced first: [(group index, count)]."""
        grp, new, prio, _, _, first = self._steps(marg, down)
        grp, new, prio = grp[first], new[first], prio[first]
        order = np.lexsort((grp, prio))
        return [(int(grp[k]), int(new[k])) for k in order]

    def _closest(self, cut: float, ratio: float, marg: np.ndarray, width: int = 20) -> bool:
        """When no single step lands in the window (tiny models, whose channels are each a
        big share of the FLOPs): take the single step, or the pair of one step up in one
        group and one down in another (the ``width`` best of each), that lands nearest
        ``ratio``, if it is nearer than ``cut``. Says whether it took one."""
        up, down = self._single(marg, False)[:width], self._single(marg, True)[:width]
        options = [(s,) for s in up + down] + [(a, b) for a in up for b in down if a[0] != b[0]]
        best, best_gap = None, abs(cut - ratio)
        for steps in options:
            gap = abs(self.cost.ratio(self.keep(*steps)) - ratio)
            if gap < best_gap - 1e-12:
                best, best_gap = steps, gap
        for k, count in best or ():
            self.counts[self.groups[k].id] = count
        return best is not None

    def _drop_rounding(self, moves) -> str | None:
        rounded = [k for k, _ in moves if self.groups[k].step > max(1, self.groups[k].nb)
                   or self.groups[k].points is not None]
        if not rounded:
            return None
        g = self.groups[rounded[0]]
        g.step, g.points = max(1, g.nb), None
        self._tables()
        return g.id

    def run(self, ratio: float, tol: float) -> list[str]:
        rounding_dropped: list[str] = []
        self._weigh(ratio)
        for _ in range(MAX_ROUNDS):
            keep = self.keep()
            cut = self.cost.ratio(keep)
            if abs(cut - ratio) <= tol:
                return rounding_dropped
            down = cut < ratio
            marg = self.cost.marginal(keep)
            steps = self._steps(marg, down)
            if not len(steps[0]):
                if down:
                    raise BudgetError(f"no legal keep set reaches a {ratio:.1%} FLOPs cut; the largest "
                                      f"reachable cut is {cut:.1%}")
                return rounding_dropped
            if self._bulk(steps, abs(ratio - cut) * self.cost.total0):
                continue
            moves = self._single(marg, down)
            landed = None
            for k, count in moves:
                new = self.cost.ratio(self.keep((k, count)))
                if (new <= ratio + tol) if down else (new >= ratio - tol):
                    landed = (k, count)
                    break
            if landed is None:  # every step jumps over the window: give up rounding on one group
                gid = self._drop_rounding(moves)
                if gid is None:  # the window is narrower than any single step: get closer
                    if self._closest(cut, ratio, marg):
                        continue  # each such step narrows the gap, so this ends
                    return rounding_dropped
                rounding_dropped.append(gid)
                continue
            self.counts[self.groups[landed[0]].id] = landed[1]
        return rounding_dropped
