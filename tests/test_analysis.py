"""One analysis per run: forks of a ChannelGraph and the hard-masked run on its own graph."""
from __future__ import annotations

import pytest
import torch

import softprune_fx as sp
from drops import random_drop
from zoo import ZOO

MODELS = ["resnet_cifar_a", "densenet", "shufflenetv2", "convnext", "misc_slicing", "mobilenetv2", "preact_resnet"]


def _outs(value):
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (tuple, list)) else [value]


@pytest.mark.parametrize("name", [m for m in MODELS if m in ZOO])
def test_run_masked_equals_the_masked_model(name):
    """HardMaskedRun on the analysis's graph computes what masked(drop) computes, and the
    pruned model (from a fork) matches both; the analysis is reusable afterwards."""
    model, inputs = ZOO[name]()
    model.eval()
    cg = sp.analyze(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(2):
        drop = random_drop(cg, seed)
        assert drop, "random_drop must drop something"
        with torch.no_grad():
            ref = _outs(cg.masked(drop).eval()(*inputs))
            run = _outs(cg.run_masked(drop))
            pruned = _outs(cg.prune(drop).eval()(*inputs))
        for a, b, c in zip(ref, run, pruned):
            assert torch.equal(a, b)
            assert (a - c).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
    # the user's model was neither sliced nor masked
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("softprune" in n for n, _ in model.named_buffers())


def test_run_masked_differs_from_the_unmasked_model():
    """A masked run that ignored the masks would equal the original: it must not."""
    model, inputs = ZOO["resnet_cifar_a"]()
    model.eval()
    cg = sp.analyze(model, inputs)
    drop = random_drop(cg, 0)
    with torch.no_grad():
        assert not torch.allclose(cg.run_masked(drop), model(*inputs))


def test_fork_maps_every_node_onto_the_copy():
    model, inputs = ZOO["densenet"]()
    cg = sp.analyze(model, inputs)
    f = cg.fork()
    nodes = set(f.gm.graph.nodes)
    assert all(s.node in nodes for s in f.flow.sites)
    assert all(n in nodes for n in f.flow.layouts)
    assert all(n in nodes for g in f.groups for n in g.chain)
    assert not any(n in nodes for n in cg.gm.graph.nodes)
    # copied weights: slicing the fork's modules leaves the analysis's alone
    name, p = next(iter(f.gm.named_parameters()))
    assert p is not cg.gm.get_parameter(name) and torch.equal(p, cg.gm.get_parameter(name))


def test_uncompiled_fork_runs_as_the_compiled_one_once_recompiled():
    """``compile=False`` (what prune uses: surgery compiles) skips only the code generation:
    after ``recompile`` the fork has the same modules, tensors, code and output."""
    model, inputs = ZOO["resnet_cifar_a"]()
    cg = sp.analyze(model.eval(), inputs)
    lazy, eager = cg.fork(compile=False), cg.fork()
    lazy.gm.recompile()
    assert lazy.gm.code == eager.gm.code
    assert dict(lazy.gm.named_modules()).keys() == dict(eager.gm.named_modules()).keys()
    assert {k: v.shape for k, v in lazy.gm.state_dict().items()} == {k: v.shape for k, v in eager.gm.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(lazy.gm.eval()(*inputs), model(*inputs))


def test_illegal_drop_refused_before_any_fork():
    model, inputs = ZOO["resnet_cifar_a"]()
    cg = sp.analyze(model, inputs)
    frozen = next(g for g in cg.groups if g.frozen_channels)
    with pytest.raises(sp.IllegalDropError):
        cg.prune({frozen.id: [frozen.frozen_channels[0]]})
    with pytest.raises(sp.IllegalDropError):
        cg.run_masked({"no such group": [0]})


@pytest.mark.parametrize("name", ["resnet_cifar_a", "convnext", "densenet"])
def test_training_the_pruned_model_leaves_the_users_model_alone(name):
    """The pruned model owns every tensor: an optimizer step on it (and an in-place edit of
    its buffers) never writes into the user's model, even for tensors surgery left as they were."""
    model, inputs = ZOO[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cg = sp.analyze(model, inputs)
    pruned = cg.prune(random_drop(cg, 0)).train()
    opt = torch.optim.SGD(pruned.parameters(), lr=1.0)
    out = _outs(pruned(*inputs))
    sum(o.float().sum() for o in out).backward()
    opt.step()
    with torch.no_grad():
        for t in list(pruned.parameters()) + list(pruned.buffers()):
            if t.is_floating_point():
                t.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    user = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in user for t in list(pruned.parameters()) + list(pruned.buffers()))


def test_prune_inplace_slices_the_users_modules():
    """``prune_channels(..., inplace=True)``: the user's own modules are sliced, and the result
    still computes what the masked model computes."""
    model, inputs = ZOO["resnet_cifar_a"]()
    model.eval()
    cg = sp.analyze(model, inputs)
    drop = random_drop(cg, 1)
    with torch.no_grad():
        ref = cg.masked(drop)(*inputs)
    widths = [m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pruned = sp.prune_channels(model, inputs, drop, inplace=True)
    after = [m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(after) < sum(widths)
    with torch.no_grad():
        assert (pruned.eval()(*inputs) - ref).abs().max() <= 1e-5


def test_a_pruned_model_that_differs_from_the_masked_one_is_refused(monkeypatch):
    """The check is enforced, not only reported: a surgery rule that gets the shapes right
    and the channels wrong (BN keeps its first k entries, not the kept ones) passes the
    shape and layout checks, so only the numeric comparison can catch it."""
    import dataclasses

    from torch import nn

    from softprune_fx.passes import registry
    from softprune_fx.passes.errors import SurgeryError
    from softprune_fx.passes.ops.tensors import set_tensor

    def first_k(sctx, node):
        m, k = sctx.module(node), int(sctx.keep_along(node, 1).sum())
        for name in ("weight", "bias", "running_mean", "running_var"):
            set_tensor(m, name, getattr(m, name).data[:k].clone())
        m.num_features = k
    entry = registry._REGISTRY[nn.BatchNorm2d]
    model, inputs = ZOO["resnet_cifar_a"]()
    _, ok = sp.prune_one_shot(model, inputs, ratio=0.4)   # the rule as registered passes
    assert ok.max_abs_diff <= 1e-4
    monkeypatch.setitem(registry._REGISTRY, nn.BatchNorm2d, dataclasses.replace(entry, surgery=first_k))
    with pytest.raises(SurgeryError, match="differs from the hard-masked model.* in float64"):
        sp.prune_one_shot(model, inputs, ratio=0.4)


def test_a_float32_miss_that_float64_clears_is_rounding_not_a_bug():
    """Randomly initialised EfficientNetV2 and RT-DETR (its top-k query selection) move past
    any float32 tolerance from summation order alone: the check then runs both forwards again
    in float64, on copies, and accepts what agrees there; the user's model stays float32."""
    from softprune_fx.finish import exact_or_raise
    from softprune_fx.passes.errors import SurgeryError
    model, inputs = ZOO["resnet_cifar_a"]()
    cg = sp.analyze(model, inputs)
    drop = random_drop(cg, 0)
    pruned = cg.prune(drop).eval()
    with torch.no_grad():
        ref, out = cg.run_masked(drop), pruned(*inputs)
    assert exact_or_raise(cg, ref, out + 1.0, drop, pruned) == pytest.approx(1.0, abs=1e-4)
    assert all(p.dtype == torch.float32 for p in [*model.parameters(), *pruned.parameters()])
    with pytest.raises(SurgeryError):  # without the models to re-run, the float32 figure stands
        exact_or_raise(cg, ref, out + 1.0)
