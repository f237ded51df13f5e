"""The exactness invariant on every zoo model: pruned == hard-masked, for random legal drops.

DESIGN.md section 2: float32 within 1e-5 and float64 within 1e-12 of max(1, max|ref|);
masking with an empty drop is the identity; FLOPs (counted by FlopCounterMode, not by
our cost model) and parameters shrink; the pruned model trains.
"""
import copy

import pytest
import torch
from torch import nn
from conftest import outputs, random_drop, rel_err
from torch.utils.flop_counter import FlopCounterMode
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.flops import MORE_FORMULAS

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=MORE_FORMULAS) as counter:
        model(*inputs)
    return counter.get_total_flops()


def as_dtype(model, inputs, dtype):
    model = copy.deepcopy(model).to(dtype)
    return model, tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruned_equals_masked(name, dtype):
    model, inputs = as_dtype(*ZOO[name](), dtype)
    cg = sp.analyze(model, inputs)
    for seed in range(2):
        drop = random_drop(cg, seed)
        ref = outputs(sp.masked(model, inputs, drop), inputs)
        got = outputs(sp.prune_channels(model, inputs, drop), inputs)
        assert [r.shape for r in ref] == [g.shape for g in got]
        assert rel_err(ref, got) <= TOL[dtype], (name, drop)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_empty_mask_is_identity_and_pruning_shrinks(name):
    model, inputs = ZOO[name]()
    base = outputs(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(base, outputs(sp.masked(model, inputs, {}), inputs)))
    cg = sp.analyze(model, inputs)
    drop = random_drop(cg, 7)
    if not drop:
        pytest.skip("no prunable group")  # not hit by the zoo: asserted in test_groups
    pruned = sp.prune_channels(model, inputs, drop)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(pruned) < n_params(model)
    assert flops(pruned, inputs) <= flops(model, inputs)
    # the user's model is untouched
    assert all(torch.equal(a, b) for a, b in zip(base, outputs(model, inputs)))


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "shufflenetv2", "convnext", "mobilenetv3"])
def test_pruned_model_trains_one_step(name):
    model, inputs = ZOO[name]()
    cg = sp.analyze(model, inputs)
    pruned = sp.prune_channels(model, inputs, random_drop(cg, 3)).train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    before = [p.detach().clone() for p in pruned.parameters()]
    out = outputs(pruned, inputs) and pruned(*inputs)
    loss = sum(t.float().pow(2).mean() for t in (out.values() if isinstance(out, dict) else
                                                 out if isinstance(out, tuple) else [out]))
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, pruned.parameters()))


class TokenShuffle(nn.Module):
    """Random numbers in eval mode (ViTMAE's token shuffle by ``torch.rand``): here a noise per token."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        t = torch.relu(self.bn(self.a(x))).flatten(2).transpose(1, 2)  # (N, tokens, C)
        return self.head(t + torch.rand(t.shape[0], t.shape[1], 1))


def test_the_check_gives_both_forwards_the_same_random_numbers():
    torch.manual_seed(0)
    model, x = TokenShuffle().eval(), (torch.randn(1, 3, 8, 8),)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.bias.normal_(0, 1)
    state = torch.random.get_rng_state()
    pruned, result = sp.prune_one_shot(model, x, 0.3, round_to=None)  # raised "differs" before
    assert result.achieved_ratio > 0.2 and result.max_abs_diff <= 1e-5
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
