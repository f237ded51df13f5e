"""SCP mask placement and the SoftPruner API on the zoo."""
import copy

import numpy as np
import pytest
import torch
from conftest import outputs
from torch import nn
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.masks import SiteMask, insert_hard_masks
from softprune_fx.passes.plan import Plan
from softprune_fx.scp import deactivation_prob, prune_prob

MODELS = ["resnet_basic", "preact_resnet", "densenet", "mobilenetv2", "mobilenetv3", "efficientnet",
          "shufflenetv2", "convnext", "cbam"]


@pytest.mark.parametrize("name", MODELS)
def test_all_masks_forced_to_keep_equal_the_original(name):
    model, inputs = ZOO[name]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    pruner.bank.force_keep = True
    for mode in (False, True):
        model.train(mode)
        pruner.model.train(mode)
        torch.manual_seed(0)  # dropout draws the same masks in both
        ref = outputs(model, inputs)
        torch.manual_seed(0)
        got = outputs(pruner.model, inputs)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), mode


@pytest.mark.parametrize("name", MODELS)
def test_one_mask_module_per_site_and_hard_masks_predict_the_pruned_model(name):
    model, inputs = ZOO[name]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    n_sites = sum(1 for m in pruner.model.modules() if isinstance(m, SiteMask))
    assert n_sites >= 1 and n_sites <= len(pruner.cg.flow.sites)
    with torch.no_grad():  # kill a third of the BN-scored and of the gated channels
        for s in pruner.bank.sites:
            beta = pruner.model.get_parameter(s.beta)
            beta[s.channel[::3]] = -50.0
        pruner.bank.gate_logits[::3] = 10.0
    keep = pruner.hard_keep()
    assert not keep.all()
    # the reference: the same (possibly not yet legal) drop as hard masks on the plain model
    cg = sp.analyze(copy.deepcopy(pruner.base).eval(), inputs)
    plan = Plan.from_drop(cg.flow, cg.groups, pruner.index.drop_from_keep(keep))
    reference = insert_hard_masks(cg.gm, cg.flow, plan)
    pruner.model.eval()
    ref = outputs(reference, inputs)
    got = outputs(pruner.model, inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= 1e-5


def test_bank_computes_the_paper_formula():
    model, inputs = ZOO["vgg"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    site = pruner.bank.sites[0]
    gamma = pruner.model.get_parameter(site.gamma).detach()
    beta = pruner.model.get_parameter(site.beta).detach()
    with torch.no_grad():
        pi = pruner.bank.prune_probs(pruner._site_params())
    c, f = site.channel[0], site.flat[0]
    expected = prune_prob(deactivation_prob(gamma[c], beta[c], site.threshold))
    assert float(pi[f]) == pytest.approx(float(expected), rel=1e-6)


def test_gates_for_groups_without_a_rectifier_and_strict():
    model, inputs = ZOO["efficientnet"]()  # SiLU: no zero region
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    has_bn = pruner.bank.has_bn.numpy()
    gated = ~has_bn & ~pruner.bank.fixed.numpy()
    assert gated.any()
    strict = sp.SoftPruner(model, inputs, ratio=0.3, strict=True)
    assert not (~strict.bank.has_bn.numpy() & ~strict.bank.fixed.numpy()).any()


def test_controller_regulariser_param_groups_and_checkpoint():
    torch.manual_seed(0)
    model, inputs = ZOO["resnet_basic"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.5)
    assert pruner.regularization().item() == 0.0  # lambda starts at 0
    pruner.model.train()
    x = torch.randn(4, *inputs[0].shape[1:])
    for _ in range(3):
        pruner.model(x)
    p = pruner.progress()
    assert p["step"] == 3 and p["lambda"] > 0 and p["target"] == 0.5
    assert set(p) >= {"hard_flops_ratio", "alive", "lambda", "target"}
    reg = pruner.regularization()
    reg.backward()
    beta = pruner.model.get_parameter(pruner.bank.sites[0].beta)
    assert (beta.grad > 0).any()  # descending the regulariser pushes beta down
    groups = pruner.param_groups(weight_decay=1e-4)
    nodecay = {id(p) for p in groups[1]["params"]}
    assert id(beta) in nodecay and id(pruner.bank.gate_logits) in nodecay and groups[1]["weight_decay"] == 0
    state = pruner.state_dict()
    other = sp.SoftPruner(model, inputs, ratio=0.5)
    other.load_state_dict(state)
    assert other.progress()["lambda"] == p["lambda"] and other.progress()["step"] == 3
    pruner.model.eval()
    other.model.eval()
    assert torch.equal(pruner.model(x), other.model(x))


def test_finalize_is_exact_and_does_not_touch_the_users_model():
    model, inputs = ZOO["mobilenetv2"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    pruned, result = pruner.finalize()
    assert abs(result.achieved_ratio - 0.3) <= 0.01 and result.max_abs_diff <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(pruned, nn.Module) and result.to_dict()["widths"]
    assert np.isfinite(result.flops_after)
