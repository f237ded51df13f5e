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


# --------------------------------------------------------------------------- beyond rectifiers (issue 10)


def _silu_pruner():
    model, inputs = ZOO["resnet_silu"]()
    return model, inputs, sp.SoftPruner(model, inputs, ratio=0.4)


def _single_site(pruner):
    """A BN site whose channels no other site also scores (not a residual stream)."""
    counts = np.bincount(pruner.bank.ent_flat.numpy(), minlength=pruner.index.size)
    return next(s for s in pruner.bank.sites if (counts[s.flat] == 1).all())


def test_silu_sites_use_the_tail_threshold_and_a_dead_channel_is_pruned():
    model, inputs, pruner = _silu_pruner()
    # BN-SiLU: gated (SCPConfig.smooth_lever), and the tail threshold still kills a channel by itself
    assert pruner.bank.sites and pruner.bank.gates().any() and not pruner.bank.scored.any()
    ts = {t for v in pruner.thresholds().values() for t in v}
    assert len(ts) == 1 and -4.6 < ts.pop() < -4.4
    site = _single_site(pruner)
    with torch.no_grad():
        pruner.model.get_parameter(site.beta)[site.channel[0]] = -6.0
        pruner.model.get_parameter(site.gamma)[site.channel[0]] = 0.1
    keep = pruner.hard_keep()
    assert not keep[site.flat[0]] and keep.sum() == len(keep) - 1


def test_live_silu_channels_do_not_tie_in_the_ranking():
    """Channels with z < -10 behind SiLU: p < 1e-23, so ``1 - p`` is exactly 1 in float64 and
    the old scores tied; keep_score still orders them by p (lower beta: less alive)."""
    model, inputs, pruner = _silu_pruner()
    site = _single_site(pruner)
    n = len(site.channel)
    with torch.no_grad():
        pruner.model.get_parameter(site.gamma)[site.channel] = 0.5
        pruner.model.get_parameter(site.beta)[site.channel] = torch.linspace(1.0, 2.0, n)
        params = pruner._site_params()
        scores = pruner.bank.scores(params)[site.flat]
        gamma, beta = pruner.bank.gather(params)
        p = torch.exp(sp.scp.log_deactivation_prob(gamma, beta, pruner.bank.ent_t, 0.05))
        p = p[np.isin(pruner.bank.ent_flat.numpy(), site.flat)].double()
    assert (1.0 - p == 1.0).all()
    assert len(np.unique(scores)) == n
    assert (np.argsort(scores) == np.arange(n)).all()  # beta increasing: score increasing


@pytest.mark.parametrize("name", ["resnet_silu", "convnext_ln"])
def test_masked_model_starts_equal_to_the_original_in_eval(name):
    model, inputs = ZOO[name]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4)
    assert pruner.hard_keep().all()
    pruner.model.eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, inputs), outputs(pruner.model, inputs)))


def test_gates_get_a_strong_pull_and_thresholds_say_gate():
    model, inputs = ZOO["convnext_ln"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4)
    assert pruner.bank.gates().any() and all(v == [] for v in pruner.thresholds().values())
    pruner.bank.controller.lam.fill_(0.1)
    pruner.regularization().backward()
    g = pruner.bank.gate_logits.grad[pruner.bank.gates()]
    w = pruner.weights[pruner.bank.gates()]
    # -log pi: the pull is lambda * w * (1 - pi) = 0.095 w at the initial pi of 0.05
    assert torch.allclose(-g, 0.1 * w * 0.95, rtol=1e-4)


def test_finalize_records_thresholds_and_warns_on_a_training_shortfall():
    model, inputs = ZOO["resnet_basic"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4)
    with pytest.warns(UserWarning, match="cut by the decision, not by training"):
        _, result = pruner.finalize()
    assert result.training_cut == 0.0 and result.training_shortfall == pytest.approx(0.4)
    assert set(result.thresholds) == {g.id for g in pruner.cg.groups if g.prunable}
    assert result.to_dict()["training_shortfall"] == pytest.approx(0.4)
    with torch.no_grad():  # a hard-rule cut near the target: no warning, no shortfall
        for s in pruner.bank.sites:
            pruner.model.get_parameter(s.beta)[s.channel[::2]] = -50.0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = sp.SoftPruner.finalize(pruner)[1]
    assert cut.training_shortfall is None and cut.training_cut > 0.35


def test_controller_state_is_in_the_state_dict():
    model, inputs = ZOO["resnet_basic"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.4, total_steps=30)
    keys = set(pruner.state_dict()["model"])
    for k in ("lam", "integral", "steps", "ramp", "hard_ratio", "mark", "stalled", "base"):
        assert f"_softprune_bank.controller.{k}" in keys
    assert int(pruner.bank.controller.ramp) == 12  # two fifths of total_steps
    other = sp.SoftPruner(model, inputs, ratio=0.4)
    assert int(other.bank.controller.ramp) == 100
    other.load_state_dict(pruner.state_dict())
    assert int(other.bank.controller.ramp) == 12


def _drive(plant, steps: int, ramp: int = 100):
    """Run a Controller against ``plant(lam, step) -> (hard cut, progress)``; the cuts seen."""
    from softprune_fx.softmask import Controller
    c = Controller(0.4, kp=0.15, ki=5e-3, lambda_max=0.2, ramp=ramp)
    cuts = []
    for step in range(steps):
        cut, progress = plant(float(c.lam), step)
        c.advance(cut, progress)
        cuts.append(cut)
    return c, cuts


def test_controller_pushes_a_cut_stalled_short_of_the_target():
    """bench_controller's glu: one channel is 12.5% of the FLOPs, so the cut sits at 0.389
    until lambda passes what the next channel needs (here 0.06), while the leading indicator
    creeps; the hold then froze lambda near 0.01 for the rest of the run."""
    creep = lambda step: 0.6 + 1e-4 * step  # noqa: E731 - progress inches up: the hold's condition
    c, cuts = _drive(lambda lam, step: (0.389 if lam < 0.06 else 0.41, creep(step)), 300)
    assert max(cuts) >= 0.41, float(c.lam)
    # once there, the wound-up pull is let go of: lambda falls back near where the push began
    assert float(c.integral) < 0.06, float(c.integral)


def test_controller_does_not_push_during_the_ramp_dead_time():
    """SiLU digits: the hard cut stays 0 while channels travel to the tail; during the ramp the
    integral must not wind up geometrically (every channel would then cross at once)."""
    c, _ = _drive(lambda lam, step: (0.0, 0.01 * step), 90)
    assert float(c.integral) < 0.02, float(c.integral)


def test_controller_leaves_a_cut_half_a_point_short_alone():
    """A cut less than half a point short and steady is not pushed."""
    c, _ = _drive(lambda lam, step: (min(0.397, 0.004 * step), 0.5), 500)
    assert abs(float(c.lam)) < 0.05, float(c.lam)
