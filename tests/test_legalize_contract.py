"""legalize's contract (issue 11): the nearest legal drop, never a refusal.

(a) the result is legal (the strict ``cg.plan`` accepts it); (b) a legal drop comes back
unchanged; (c) among legal drops it changes the fewest channels, then drops the most, then
the lowest summed score, then the highest summed flat id (brute force over every drop of
graphs with at most 10 free channels); (d) non-empty whenever the drop is and a non-empty
legal drop exists; (e) it raises only for unknown ids, out-of-range and frozen channels.
"""
import random

import numpy as np
import pytest
from randarch import random_model

import softprune_fx as sp
from softprune_fx.passes.errors import IllegalDropError
from softprune_fx.passes.flow import Balance, Grid

# tiny random architectures (at most 10 free channels) holding a grouped conv or a shuffle
TINY = [3, 13, 40, 47, 49, 50, 51, 57, 65, 84, 110, 118, 126, 144, 145, 155, 159, 160]
PLAIN_TINY = [0, 6, 10, 14]


def _legal(cg, drop) -> bool:
    try:
        cg.plan(drop)
        return True
    except IllegalDropError:
        return False


def _key(keep0, keep, score):
    dropped = ~keep
    return (int((keep != keep0).sum()), -int(dropped.sum()), round(float(score[dropped].sum()), 6),
            -int(np.flatnonzero(dropped).sum()))


def _scores(cg, score):
    return {g.id: score[cg.index.ids(g.id)] for g in cg.groups}


def _every_legal(cg):
    index = cg.index
    free = np.flatnonzero(~index.frozen)
    assert len(free) <= 10
    legal = []
    for bits in range(1 << len(free)):
        keep = np.ones(index.size, bool)
        keep[free[[(bits >> j) & 1 == 1 for j in range(len(free))]]] = False
        if _legal(cg, index.drop_from_keep(keep)):
            legal.append(keep)
    return free, legal


@pytest.mark.parametrize("seed", TINY + PLAIN_TINY)
def test_nearest_by_brute_force(seed):
    model, inputs = random_model(seed, tiny=True)
    cg = sp.analyze(model, inputs)
    index = cg.index
    if seed in TINY:
        assert any(isinstance(c, (Balance, Grid)) for c in cg.constraints)
    free, legal = _every_legal(cg)
    rng = np.random.default_rng(seed)
    for trial in range(12):
        keep0 = np.ones(index.size, bool)
        keep0[free[rng.random(len(free)) < rng.uniform(0.1, 0.9)]] = False
        score = rng.random(index.size) if trial % 2 else np.zeros(index.size)
        got = index.keep_from_drop(cg.legalize(index.drop_from_keep(keep0), _scores(cg, score)))
        assert _legal(cg, index.drop_from_keep(got))                                       # (a)
        pool = legal
        if (~keep0).any() and any((~k).any() for k in legal):
            pool = [k for k in legal if (~k).any()]
            assert (~got).any()                                                             # (d)
        best = min(_key(keep0, k, score) for k in pool)
        assert _key(keep0, got, score) == best, (index.drop_from_keep(keep0), index.drop_from_keep(got))  # (c)
    for keep in legal:                                                                      # (b)
        drop = index.drop_from_keep(keep)
        assert cg.legalize(drop) == drop


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_any_drop_is_repaired_on_random_architectures(seed):
    model, inputs = random_model(seed)
    cg = sp.analyze(model, inputs)
    rng = random.Random(seed)
    for frac in (0.3, 0.7, 1.0):
        drop = {}
        for g in cg.groups:
            free = [i for i in range(g.width) if i not in g.frozen_channels]
            if g.prunable and free:
                drop[g.id] = rng.sample(free, max(1, int(frac * len(free))))
        got = cg.legalize(drop)                                                             # (e): no raise
        assert _legal(cg, got)                                                              # (a)
        assert got                                                                          # (d)
        assert cg.legalize(got) == got                                                      # (b)


def test_raises_only_for_bad_names():
    model, inputs = random_model(0)
    cg = sp.analyze(model, inputs)
    g = next(g for g in cg.groups if g.prunable)
    with pytest.raises(IllegalDropError, match="unknown group"):
        cg.legalize({"no such group": [0]})
    with pytest.raises(IllegalDropError, match="out of range"):
        cg.legalize({g.id: [g.width]})
    frozen = next(g for g in cg.groups if g.frozen_channels)
    with pytest.raises(IllegalDropError, match="frozen"):
        cg.legalize({frozen.id: [frozen.frozen_channels[0]]})
    with pytest.raises(IllegalDropError, match="every channel"):               # masked stays strict
        sp.masked(model, inputs, {g.id: list(range(g.width))})


@pytest.mark.parametrize("seed", range(0, 160, 4))
def test_one_shot_check_agrees_with_each_rule(seed):
    """The engine's vectorised ``violations`` (the check behind ``plan``, ``legalize`` and
    the decision) names exactly the rules whose own ``check`` fails, on random keep sets of
    random architectures; and no partly kept unit where every grid column is whole."""
    model, inputs = random_model(seed)
    engine = sp.analyze(model, inputs).index.constraints
    rng = np.random.default_rng(seed)
    n = len(engine.unit_of) - 1
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        keep = rng.random(n) >= p
        bad_units, bad_bal, bad_ne = engine.violations(keep)
        assert list(bad_ne) == [k for k, r in enumerate(engine.nonempty) if r.check(keep) is not None]
        assert list(bad_bal) == [k for k, r in enumerate(engine.balances) if r.check(keep) is not None]
        kept_per_unit = np.bincount(engine.unit_of[:-1], weights=keep, minlength=engine.n_units)
        partly = (kept_per_unit > 0) & (kept_per_unit < engine.unit_size)
        assert list(bad_units) == list(np.flatnonzero(partly | (engine.forced & (kept_per_unit < engine.unit_size))))
        assert bool(len(bad_units)) >= any(g.check(keep) is not None for g in engine.grids)
