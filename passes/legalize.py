"""Legalize a drop: the nearest legal drop, by the constraint engine (``constraints``).

``nearest(engine, keep, score)`` returns the legal keep vector that

1. changes the fewest channels from ``keep`` (drops added or taken back), then
2. drops the most channels, then the lowest summed score, then the highest summed flat id;
3. keeps every group, split piece and conv group non-empty, and drops something whenever
   ``keep`` drops something and a non-empty legal drop exists.

How: the per-unit optimum (a Grid unit goes the way most of its channels went) is the
answer when it is legal. Otherwise the violated rules are added to a relaxation, its
connected components (units tied by a rule) are solved exactly, and rules the solution
violates join; a relaxed optimum that is legal is the optimum. A component is solved by
enumeration (up to ``EXACT_UNITS`` free units) or, for one grouped conv with distinct
positions, by trying every common block count; larger mixed components use the rules'
local repairs and, failing those, keep the component whole (always legal). Only those
last components may be farther than the nearest.

``check_plan`` stays strict: ``masked``, ``prune_channels`` and ``apply_plan`` refuse an
illegal drop; only ``legalize`` repairs.

Example::

    plan = Plan.from_drop(flow, groups, {"conv1": [0]})
    legalize_plan(plan, flow.constraints, scores=None)
"""
from __future__ import annotations

import numpy as np
from networkx.utils import UnionFind

from .constraints import BalanceRule, Constraints, NonEmptyRule, Space
from .errors import IllegalDropError
from .plan import Plan

EXACT_UNITS = 16
LOCAL_ROUNDS = 30


class _Problem:
    """Unit-level costs of one legalize call: dropping unit u instead of keeping it
    changes the key (changes, -drops, score dropped, -flat ids dropped) by ``delta[u]``."""

    def __init__(self, engine: Constraints, keep0: np.ndarray, score: np.ndarray):
        self.engine = engine
        unit = engine.unit_of[:-1]
        k = engine.unit_size.astype(float)
        d = np.bincount(unit, weights=~keep0, minlength=engine.n_units)
        s = np.bincount(unit, weights=score, minlength=engine.n_units)
        ids = np.bincount(unit, weights=np.arange(len(unit), dtype=float), minlength=engine.n_units)
        self.delta = np.stack([k - 2 * d, -k, np.round(s, 9), -ids], 1)
        self.touched = d > 0
        self.best = self.touched & (2 * d >= k) & ~engine.forced     # True = unit dropped

    def keep(self, dropped: np.ndarray) -> np.ndarray:
        return ~dropped[self.engine.unit_of[:-1]]

    def key(self, dropped: np.ndarray) -> tuple:
        return tuple(np.round(self.delta[dropped].sum(0), 6).tolist())


def _rule_units(engine: Constraints, rule) -> tuple[np.ndarray, np.ndarray]:
    return engine.unit_of[rule.a], engine.unit_of[rule.b]


def _lexmin(keys: np.ndarray) -> int:
    return int(np.lexsort(keys.T[::-1])[0])


def _enumerate(prob: _Problem, free: np.ndarray, rules: list, state: np.ndarray):
    """Exact: every assignment of the ``free`` units (at most EXACT_UNITS)."""
    n = len(free)
    bits = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)     # True = dropped
    local = {int(u): j for j, u in enumerate(free)}
    kept = np.concatenate([~bits, np.ones((len(bits), 1), bool), np.zeros((len(bits), 1), bool)], 1)
    ok = np.ones(len(bits), dtype=bool)

    def col(units):
        return np.array([local.get(int(u), n if u < 0 or not state[u] else n + 1) for u in units], dtype=np.int64)
    for r in rules:
        ua, ub = _rule_units(prob.engine, r)
        pk = kept[:, col(ua)] & kept[:, col(ub)]
        if isinstance(r, BalanceRule):
            ok &= r.holds(pk.astype(np.int64) @ np.eye(r.nb, dtype=np.int64)[r.block])
        else:
            ok &= r.holds(pk.sum(1))
    if not ok.any():
        return None
    keys = bits[ok].astype(float) @ prob.delta[free]
    return bits[ok][_lexmin(keys)]


def _balance_exact(prob: _Problem, free: np.ndarray, rule: BalanceRule, state: np.ndarray):
    """Exact for one balance whose free positions are distinct single units: try every
    common count t; each block drops its free units of smallest delta."""
    ua, ub = _rule_units(prob.engine, rule)
    is_free = np.isin(ua, free)
    const_kept = ~is_free & ((ua < 0) | ~state[np.maximum(ua, 0)]) & ((ub < 0) | ~state[np.maximum(ub, 0)])
    out = np.zeros(len(free), dtype=bool)
    where = {int(u): j for j, u in enumerate(free)}
    per_block, floor, ceil = [], 1, None
    for blk in range(rule.nb):
        m = rule.block == blk
        units = ua[m & is_free]
        d = prob.delta[units]
        order = np.lexsort(d.T[::-1]) if len(units) else np.zeros(0, np.int64)
        cum = np.vstack([np.zeros((1, 4)), np.cumsum(d[order], 0)])
        f = int(const_kept[m].sum())
        per_block.append((units[order], cum, f, len(units)))
        floor = max(floor, f)
        ceil = f + len(units) if ceil is None else min(ceil, f + len(units))
    if ceil is None or floor > ceil:
        return None
    keys = []
    for t in range(floor, ceil + 1):
        keys.append(sum(cum[n - (t - f)] for _, cum, f, n in per_block))
    t = floor + _lexmin(np.array(keys))
    for units, _, f, n in per_block:
        for u in units[:n - (t - f)]:
            out[where[int(u)]] = True
    return out


def _nonempty_exact(prob: _Problem, free: np.ndarray, rule: NonEmptyRule, state: np.ndarray):
    """Exact for one non-empty rule: every free unit at its own best, then the position
    whose taking back costs least is taken back."""
    where = {int(u): j for j, u in enumerate(free)}
    out = prob.best[free] & ~state[free] | state[free]
    ua, ub = _rule_units(prob.engine, rule)
    costs, parts = [], []
    for a, b in zip(ua.tolist(), ub.tolist()):
        back = [u for u in {a, b} if u >= 0 and (out[where[u]] if u in where else state[u])]
        if any(u not in where for u in back):
            continue                                      # a pinned unit: this position stays dropped
        costs.append(-sum((prob.delta[u] for u in back), np.zeros(4)))
        parts.append(back)
    if not costs:
        return None
    for u in parts[_lexmin(np.array(costs))]:
        out[where[u]] = False
    return out


def _local(prob: _Problem, comp_units: np.ndarray, rules: list, state: np.ndarray, score: np.ndarray):
    """Large mixed components: the rules' own repairs, round after round; else keep the
    component whole (legal for its rules)."""
    engine = prob.engine
    keep = prob.keep(state)
    for _ in range(LOCAL_ROUNDS):
        bad = [r for r in rules if r.check(keep) is not None]
        if not bad:
            break
        for r in bad:
            keep = r.repair(keep, score)
            for g in engine.grids:
                keep = g.repair(keep, score)
    kc = np.bincount(engine.unit_of[:-1], weights=keep, minlength=engine.n_units)
    dropped = kc[comp_units] < engine.unit_size[comp_units]
    trial = state.copy()
    trial[comp_units] = dropped & ~engine.forced[comp_units]
    if all(r.check(prob.keep(trial)) is None for r in rules):
        return trial[comp_units]
    return None


def _solve(prob: _Problem, comp_units: np.ndarray, rules: list, state: np.ndarray, pinned: np.ndarray,
           score: np.ndarray):
    """Dropped state of ``comp_units`` minimising the key under ``rules``; None if none."""
    fixed = prob.engine.forced[comp_units] | pinned[comp_units]
    free = comp_units[~fixed]
    base = state.copy()
    base[comp_units] = pinned[comp_units]
    got = None
    if len(free) <= EXACT_UNITS:
        got = _enumerate(prob, free, rules, base)
    elif len(rules) == 1 and isinstance(rules[0], BalanceRule) and _distinct(prob.engine, rules[0], free):
        got = _balance_exact(prob, free, rules[0], base)
    elif len(rules) == 1 and isinstance(rules[0], NonEmptyRule):
        got = _nonempty_exact(prob, free, rules[0], base)
    if got is not None:
        base[free] = got
        return base[comp_units]
    start = base.copy()
    start[comp_units] = (prob.best[comp_units] & ~prob.engine.forced[comp_units]) | pinned[comp_units]
    local = _local(prob, comp_units, rules, start, score)
    if local is not None and not (pinned[comp_units] & ~local).any():
        return local
    if pinned[comp_units].any():
        return None
    return np.zeros(len(comp_units), dtype=bool)      # the component whole: legal for its rules


def _distinct(engine: Constraints, rule: BalanceRule, free: np.ndarray) -> bool:
    ua, ub = _rule_units(engine, rule)
    f = ua[np.isin(ua, free)]
    return not np.isin(ub, free).any() and len(np.unique(f)) == len(f)


def _relaxed(prob: _Problem, score: np.ndarray, pinned: np.ndarray):
    """The lazy relaxation (module doc); None when a pinned unit cannot stay dropped."""
    engine = prob.engine
    state = prob.best | pinned
    if (pinned & engine.forced).any():
        return None
    bal, ne = set(), set()
    for _ in range(len(engine.balances) + len(engine.nonempty) + 1):
        _, bad_bal, bad_ne = engine.violations(prob.keep(state))
        if not len(bad_bal) and not len(bad_ne):
            return state
        bal |= set(bad_bal.tolist())
        ne |= set(bad_ne.tolist())
        rules = [engine.balances[k] for k in sorted(bal)] + [engine.nonempty[k] for k in sorted(ne)]
        state = prob.best | pinned
        for comp_units, comp_rules in _components(engine, rules):
            got = _solve(prob, comp_units, comp_rules, state, pinned, score)
            if got is None:
                return None
            state[comp_units] = got
    return None


def _components(engine: Constraints, rules: list):
    """(units, rules) of each connected component of the rules' free units."""
    uf = UnionFind()
    rule_units = []
    for r in rules:
        ua, ub = _rule_units(engine, r)
        us = np.unique(np.concatenate([ua, ub]))
        us = us[(us >= 0) & ~engine.forced[np.maximum(us, 0)]]
        rule_units.append(us)
        if len(us):
            uf.union(*us.tolist())
    comps: dict[int, tuple[list, list]] = {}
    for r, us in zip(rules, rule_units):
        if len(us):
            entry = comps.setdefault(uf[int(us[0])], ([], []))
            entry[0].append(us)
            entry[1].append(r)
    for units, rs in comps.values():
        yield np.unique(np.concatenate(units)), rs


def nearest(engine: Constraints, keep0: np.ndarray, score: np.ndarray | None = None) -> np.ndarray:
    """The nearest legal keep vector to ``keep0`` (module doc)."""
    keep0 = np.asarray(keep0, dtype=bool) | engine.space.frozen
    score = np.zeros(len(keep0)) if score is None else np.clip(np.nan_to_num(np.asarray(score, float)), -1e12, 1e12)
    if engine.legal(keep0):
        return keep0
    prob = _Problem(engine, keep0, score)
    none = np.zeros(engine.n_units, dtype=bool)
    state = _relaxed(prob, score, none)
    if state is None:
        return np.ones_like(keep0)
    if not state.any() and prob.touched.any():
        alt = _nonempty(prob, score)
        state = state if alt is None else alt
    return prob.keep(state)


def _nonempty(prob: _Problem, score: np.ndarray, limit: int = 256):
    """Best legal state that drops something: pin one free unit dropped at a time, in the
    order of a lower bound on the result (the relaxed optimum plus that unit's own cost),
    stopping once the bound reaches the best found (at most ``limit`` pins)."""
    engine = prob.engine
    cands = np.flatnonzero(~engine.forced)
    bound = np.where(prob.best[cands, None], 0.0, prob.delta[cands])
    order = np.lexsort(bound.T[::-1])[:limit]
    best, best_key = None, None
    for u, lb in zip(cands[order], bound[order]):
        if best_key is not None and tuple(np.round(lb, 6)) >= tuple(np.subtract(best_key, prob.key(prob.best))):
            break
        pinned = np.zeros(engine.n_units, dtype=bool)
        pinned[u] = True
        state = _relaxed(prob, score, pinned)
        if state is not None and engine.legal(prob.keep(state)):
            key = prob.key(state)
            if best_key is None or key < best_key:
                best, best_key = state, key
    return best


# ---------------------------------------------------------------------- plans


def _engine(plan: Plan) -> Constraints:
    return Constraints.build(plan.flow, plan.groups)


def plan_keep(plan: Plan, space: Space) -> np.ndarray:
    """The keep vector of a plan over the flat space."""
    keep = np.ones(space.size, dtype=bool)
    if plan.dropped_classes:
        roots = np.fromiter(plan.dropped_classes, dtype=np.int64)
        flat = space._flat_of_root[roots]
        keep[flat[flat >= 0]] = False
    for gid, pos in plan.site_drops.items():
        if pos:
            keep[space.offsets[gid] + np.fromiter(pos, dtype=np.int64)] = False
    return keep


def _write(plan: Plan, space: Space, keep: np.ndarray) -> None:
    plan.dropped_classes.clear()
    plan.site_drops.clear()
    for gid, idx in space.drop_from_keep(keep).items():
        plan.drop_many(plan.by_id[gid], np.asarray(idx, dtype=np.int64))


def legalize_plan(plan: Plan, constraints: list | None = None, scores: dict | None = None) -> Plan:
    """Replace ``plan``'s drop by the nearest legal drop (in place); ``scores`` maps a group
    id to per-channel scores (higher = keep)."""
    engine = _engine(plan)
    space = engine.space
    score = np.zeros(space.size)
    for gid, s in (scores or {}).items():
        if gid in space.offsets:
            score[space.ids(gid)] = np.asarray(s, dtype=float)
    keep0 = plan_keep(plan, space)
    keep = nearest(engine, keep0, score)
    if not np.array_equal(keep, keep0):  # already legal: the plan stands as it is
        _write(plan, space, keep)
    return plan


def check_plan(plan: Plan, constraints: list | None = None) -> None:
    """Raise IllegalDropError unless nothing is emptied and every constraint holds."""
    engine = _engine(plan)
    msg = engine.explain(plan_keep(plan, engine.space))
    if msg is not None:
        raise IllegalDropError(msg)
