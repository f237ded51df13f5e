"""The budget decision: generic over the cost protocol, legal by construction, honest errors."""
import numpy as np
import pytest
from randarch import random_model
from test_cost import _pyramid

import softprune_fx as sp
from softprune_fx.cost import CostModel
from softprune_fx.decide import decide, rounding_step
from softprune_fx.passes.errors import BudgetError


class ProtocolCost:
    """Only the CostModel protocol (``total0``, ``flops``, ``ratio``, ``marginal``), on a
    cost that is not FLOPs: each channel weighs ``w`` times its FLOPs, plus a constant.
    A decision that reached into CostModel internals would fail on it."""

    def __init__(self, inner: CostModel, w: np.ndarray, constant: float):
        self._inner, self._w, self._c = inner, w, constant
        self.total0 = self.flops(np.ones(len(w)))

    def flops(self, keep):
        keep = np.asarray(keep, float)
        return self._c + self._inner.flops(keep) + float(self._w @ keep)

    def ratio(self, keep):
        return 1.0 - self.flops(keep) / self.total0

    def marginal(self, keep):
        return self._inner.marginal(keep) + self._w


def _setup(model, inputs):
    cg = sp.analyze(model, inputs)
    index = cg.index
    return cg, index, CostModel(cg, index, model, inputs)


def test_decision_is_generic_over_the_cost_protocol():
    cg, index, flops_cost = _setup(*_pyramid())
    rng = np.random.default_rng(0)
    cost = ProtocolCost(flops_cost, rng.random(index.size) * 1e5, 0.05 * flops_cost.total0)
    d = decide(cg, index, cost, np.ones(index.size), np.ones(index.size, bool), 0.3, round_to=None)
    assert abs(d.achieved - 0.3) <= 0.01
    assert abs(flops_cost.ratio(d.keep) - 0.3) > 1e-3       # it steered on the given cost, not on FLOPs


def test_budget_error_names_the_largest_reachable_cut():
    cg, index, cost = _setup(*_pyramid())
    with pytest.raises(BudgetError, match=r"largest reachable cut is \d+\.\d%"):
        decide(cg, index, cost, np.ones(index.size), np.ones(index.size, bool), 0.9999)


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_decision_is_legal_as_priced(seed):
    """The search legalizes every keep set it prices: legalize changes nothing, and the
    reported cut is the cut of the drop."""
    model, inputs = random_model(seed)
    cg, index, cost = _setup(model, inputs)
    scores = np.random.default_rng(seed).random(index.size)
    try:
        d = decide(cg, index, cost, scores, np.ones(index.size, bool), 0.3, round_to="auto")
    except BudgetError:
        return
    assert cg.legalize(d.drop, {g.id: scores[index.ids(g.id)] for g in cg.groups}) == d.drop
    assert cost.ratio(index.keep_from_drop(d.drop)) == pytest.approx(d.achieved)


def test_rounding_step():
    assert [rounding_step(w, "auto") for w in (8, 16, 17, 63, 64)] == [1, 1, 8, 8, 16]
    assert rounding_step(100, None) == 1 and rounding_step(100, 32) == 32
