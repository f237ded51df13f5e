"""Random architectures nobody wrote by hand keep the invariant (float64, 1e-12)."""
import pytest
from conftest import outputs, random_drop, rel_err
from drops import fraction_drop
from randarch import random_model

import softprune_fx as sp


def _exact(model, inputs, drop):
    ref = outputs(sp.masked(model, inputs, drop), inputs)
    got = outputs(sp.prune_channels(model, inputs, drop), inputs)
    assert rel_err(ref, got) <= 1e-12, drop


@pytest.mark.parametrize("seed", range(40))
def test_random_architecture_invariant(seed):
    model, inputs = random_model(seed)
    model = model.double()
    inputs = tuple(x.double() for x in inputs)
    cg = sp.analyze(model, inputs)
    assert any(g.prunable for g in cg.groups)
    for k in range(2):
        drop = random_drop(cg, 100 * seed + k)
        assert sum(map(len, drop.values())) > 0
        _exact(model, inputs, drop)
    # a 30% drop of every prunable group is repaired (never refused) and stays exact
    drop = cg.legalize(fraction_drop(cg, seed, 0.3))
    assert drop
    _exact(model, inputs, drop)
