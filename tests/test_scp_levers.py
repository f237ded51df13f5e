"""Where SoftPruner's budget pushes (SCPConfig.smooth_lever) and the group floor of the hard rule.

Behind a smooth activation (SiLU, GELU) the pull on beta slides every channel together into
the tail, where the next BN rescales them back, so the loss cannot resist (BENCHMARKS.md
section 10): such channels get a learned gate as the lever, and their BN threshold still
kills a channel by itself. Behind an exact zero region (ReLU) beta stays the lever.
"""
import numpy as np
import pytest
import torch
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.scp import SCPConfig, log_either_prunes


def _pruner(name, **scp):
    model, inputs = ZOO[name]()
    return sp.SoftPruner(model, inputs, ratio=0.4, scp=SCPConfig(**scp))


def _pull(pruner):
    """Gradients of the regulariser alone at lambda 0.1: (on the site betas, on the gate logits)."""
    pruner.bank.controller.lam.fill_(0.1)
    pruner.model.zero_grad(set_to_none=False)
    pruner.regularization().backward()
    betas = [pruner.model.get_parameter(s.beta).grad for s in pruner.bank.sites]
    beta_pull = sum(float(g.abs().sum()) for g in betas if g is not None)
    gates = pruner.bank.gates()
    gate_pull = float(pruner.bank.gate_logits.grad[gates].abs().sum()) if gates.any() else 0.0
    return beta_pull, gate_pull


def test_silu_sites_are_pulled_through_gates_not_beta():
    beta_pull, gate_pull = _pull(_pruner("resnet_silu"))
    assert beta_pull == 0.0 and gate_pull > 0.0


def test_silu_sites_with_the_bn_lever_pull_beta_and_have_no_gates():
    pruner = _pruner("resnet_silu", smooth_lever="bn")
    assert not pruner.bank.gates().any()
    beta_pull, gate_pull = _pull(pruner)
    assert beta_pull > 0.0 and gate_pull == 0.0


def test_relu_sites_keep_the_pull_on_beta():
    pruner = _pruner("resnet_basic")
    assert pruner.bank.scored.any() and not pruner.bank.gates().any()
    beta_pull, _ = _pull(pruner)
    assert beta_pull > 0.0


def test_strict_means_no_gates_even_behind_silu():
    model, inputs = ZOO["resnet_silu"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4, strict=True)
    assert not pruner.bank.gates().any() and pruner.bank.scored.any()


def test_log_either_prunes_is_one_minus_the_product_of_keeps():
    a, b = torch.tensor([0.05, 0.5, 0.0]), torch.tensor([0.73, 0.0, 0.0])
    got = log_either_prunes(torch.log1p(-a), torch.log1p(-b)).exp()
    assert got.tolist() == pytest.approx((1 - (1 - a) * (1 - b)).tolist(), abs=1e-7)


def test_a_gated_silu_channel_dies_by_its_gate_or_by_its_bn():
    pruner = _pruner("resnet_silu")
    counts = np.bincount(pruner.bank.ent_flat.numpy(), minlength=pruner.index.size)
    site = next(s for s in pruner.bank.sites if (counts[s.flat] == 1).all())  # not a residual stream
    a, b = int(site.flat[0]), int(site.flat[1])
    with torch.no_grad():
        pruner.bank.gate_logits[a] = 3.0                        # the gate prunes a
        pruner.model.get_parameter(site.beta)[site.channel[1]] = -8.0  # the BN kills b (t = -4.49)
        pruner.model.get_parameter(site.gamma)[site.channel[1]] = 0.1
    keep = pruner.hard_keep()
    assert not keep[a] and not keep[b]
    assert keep.sum() == len(keep) - 2


# --------------------------------------------------------------------------- the group floor


def _group_ids(pruner, gid):
    return pruner.index.ids(gid)


def test_hard_rule_never_empties_a_group():
    pruner = _pruner("convnext_ln")
    g = next(g for g in pruner.cg.groups if g.prunable and g.width >= 4)
    ids = _group_ids(pruner, g.id)
    with torch.no_grad():
        pruner.bank.gate_logits[ids] = torch.linspace(2.0, 4.0, len(ids))  # every gate prunes
    keep = pruner.hard_keep()
    assert keep[ids].sum() == 1 and keep[ids[0]]  # the least-pruned channel survives
    # and the eval mask the network trains towards keeps it too: the masked model's output moves
    pruner.model.eval()
    assert pruner.progress()["alive"][g.id] == 1


def test_floor_follows_min_width():
    model, inputs = ZOO["convnext_ln"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4, min_width=3, round_to="none")
    g = next(g for g in pruner.cg.groups if g.prunable and g.width >= 4)
    ids = _group_ids(pruner, g.id)
    with torch.no_grad():
        pruner.bank.gate_logits[ids] = 5.0
        pruner.bank.gate_logits[ids[-3:]] = torch.tensor([4.0, 4.5, 4.2])
    keep = pruner.hard_keep()
    assert keep[ids].sum() == 3 and keep[ids[-3:]].all()
    # a group above its floor is left to the rule
    with torch.no_grad():
        pruner.bank.gate_logits[ids] = -3.0
    assert pruner.hard_keep()[ids].all()


def test_floor_keeps_the_masked_model_connected():
    """Every gate of every group pruned: without the floor the masked model outputs a constant."""
    model, inputs = ZOO["convnext_ln"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4)
    with torch.no_grad():
        pruner.bank.gate_logits.fill_(5.0)
    pruner.model.eval()
    x = torch.randn(4, *inputs[0].shape[1:])
    with torch.no_grad():
        out = pruner.model(x)
    assert float(out.std(0).max()) > 1e-6  # the outputs still depend on the input
    keep = pruner.hard_keep()
    free = ~pruner.bank.fixed.numpy()
    for g in pruner.cg.groups:
        ids = _group_ids(pruner, g.id)
        if g.prunable and free[ids].any():
            assert keep[ids].sum() >= 1, g.id
    assert np.isfinite(pruner.bank.scores(pruner._site_params())).sum() > 0


def test_deactivation_gradient_is_finite_as_gamma_vanishes():
    """A Hardswish channel (t = -3) with beta above t and gamma pulled to ~0 (z = -7.5e5): log_ndtr's
    backward was NaN there, which turned mobilenetv3's parameters to NaN and its cut to 100%."""
    from softprune_fx.scp import log_deactivation_prob, prune_prob, soft_keep
    gamma = torch.tensor([-3.5e-6, 1e-9, 0.5], requires_grad=True)
    beta = torch.tensor([-0.31, -5.0, -0.3], requires_grad=True)
    logp = log_deactivation_prob(gamma, beta, t=-3.0)
    soft_keep(prune_prob(torch.exp(logp)), generator=torch.Generator().manual_seed(0)).sum().backward()
    assert torch.isfinite(gamma.grad).all() and torch.isfinite(beta.grad).all()
    assert logp[0] < -1e5 and logp[1] == 0.0  # still alive / surely dead
