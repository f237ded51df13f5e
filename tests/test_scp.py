"""Tests of the SCP formulas in softprune_fx/scp.py, against values computed by hand."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from softprune_fx import scp
from softprune_fx.scp import (
    SCPConfig,
    combine_log_sites,
    combine_sites,
    deactivation_prob,
    gate_init_logit,
    gate_prob,
    gate_regularizer,
    hard_keep,
    keep_score,
    log_deactivation_prob,
    prune_prob,
    rectifier_threshold,
    scp_regularizer,
    soft_keep,
)


def phi(z: float) -> float:
    """Standard normal CDF, independent of torch."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))  # erfc: accurate far into the left tail


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- config


def test_config_defaults_frozen_and_match_function_defaults():
    cfg = SCPConfig()
    assert (cfg.eps, cfg.k, cfg.c0, cfg.tau, cfg.s, cfg.delta, cfg.s_smooth) == (0.05, 20.0, 0.95, 0.5, 2.0, 0.05, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 1.0  # type: ignore[misc]
    defaults = {
        "eps": inspect.signature(deactivation_prob).parameters["eps"].default,
        "k": inspect.signature(prune_prob).parameters["k"].default,
        "c0": inspect.signature(prune_prob).parameters["c0"].default,
        "tau": inspect.signature(soft_keep).parameters["tau"].default,
        "s": inspect.signature(scp_regularizer).parameters["s"].default,
        "delta": 0.05,
        "s_smooth": 0.0,
        "smooth_lever": "gate",
        "gate_spread": 0.0,
        "silence_revived": True,
        "straight_through": True,
        "order_live_gates": True,
    }
    assert defaults == dataclasses.asdict(cfg)


@pytest.mark.parametrize("bad", [dict(smooth_lever="beta"), dict(c0=1.0), dict(c0=0.0), dict(tau=0.0), dict(k=-1.0), dict(eps=-0.1),
                                 dict(delta=0.0), dict(delta=1.0), dict(gate_spread=-0.1), dict(gate_spread=3.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SCPConfig(**bad)


# --------------------------------------------------------------------------- rectifiers


@pytest.mark.parametrize("obj", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.ReLU, nn.ReLU6,
                                 F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, "relu", "relu_"])
def test_rectifier_threshold_relu_family(obj):
    assert rectifier_threshold(obj) == 0.0


@pytest.mark.parametrize("obj", [nn.Hardswish(), nn.Hardswish, F.hardswish])
def test_rectifier_threshold_hardswish(obj):
    assert rectifier_threshold(obj) == -3.0


@pytest.mark.parametrize("obj", [nn.SiLU(), nn.GELU(), nn.LeakyReLU(), nn.LeakyReLU, nn.Hardtanh(),
                                 nn.Sigmoid(), nn.Identity(), F.silu, F.gelu, F.leaky_relu,
                                 torch.sigmoid, "sigmoid", None, 3])
def test_rectifier_threshold_none(obj):
    assert rectifier_threshold(obj) is None


def test_thresholds_are_real_zero_regions():
    x = torch.linspace(-10, 10, 2001)
    for act in (nn.ReLU(), nn.ReLU6(), nn.Hardswish()):
        t = rectifier_threshold(act)
        assert torch.all(act(x[x <= t]) == 0)
        assert torch.all(act(x[(x > t) & (x < 0)]) != 0)  # the zero region ends at t (below 0)


# --------------------------------------------------------------------------- deactivation


def test_deactivation_prob_relu_by_hand():
    p = deactivation_prob(t64(0.1), t64(-0.2), t=0.0, eps=0.05)
    assert p.item() == pytest.approx(phi(2.5), abs=1e-8)
    assert p.item() == pytest.approx(0.9937903, abs=1e-6)


def test_deactivation_prob_hardswish_by_hand():
    # z = (-3 + 0.05 - (-2.5)) / 0.5 = -0.9
    gamma, beta = t64(-0.5), t64(-2.5)
    p = deactivation_prob(gamma, beta, t=rectifier_threshold(nn.Hardswish()), eps=0.05)
    assert p.item() == pytest.approx(phi(-0.9), abs=1e-8)
    assert p.item() == pytest.approx(0.1840601, abs=1e-6)


def test_deactivation_prob_float32_and_vector():
    gamma = torch.tensor([1.0, 0.1, 2.0])
    beta = torch.tensor([0.0, -0.2, 1.0])
    p = deactivation_prob(gamma, beta)
    expected = [phi(0.05), phi(2.5), phi((0.05 - 1.0) / 2.0)]
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx(expected, abs=1e-6)


def test_deactivation_prob_monotone():
    beta = torch.linspace(-2, 2, 41)
    p = deactivation_prob(torch.ones(41), beta)
    assert torch.all(p[1:] < p[:-1])  # higher beta: less often dead


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deactivation_prob_gamma_zero_no_nan(dtype):
    beta = torch.tensor([-1.0, 0.0, 0.05, 0.3], dtype=dtype, requires_grad=True)
    gamma = torch.zeros(4, dtype=dtype, requires_grad=True)
    p = deactivation_prob(gamma, beta)
    assert p.tolist() == [1.0, 1.0, 0.5, 0.0]
    p.sum().backward()
    assert torch.isfinite(gamma.grad).all() and torch.isfinite(beta.grad).all()
    assert beta.grad[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]


def test_deactivation_prob_gradient_sign():
    gamma = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.2, 0.2], dtype=torch.float64, requires_grad=True)
    deactivation_prob(gamma, beta).sum().backward()
    assert torch.all(beta.grad < 0)  # raising beta makes the channel live
    # beta above the threshold: shrinking |gamma| lowers p
    assert gamma.grad[0] > 0 and gamma.grad[1] < 0
    assert torch.autograd.gradcheck(lambda g, b: deactivation_prob(g, b), (gamma, beta))


# --------------------------------------------------------------------------- prune prob


def test_prune_prob_at_c0_and_bound():
    assert prune_prob(torch.tensor(0.95)).item() == pytest.approx(0.5, abs=1e-6)
    bound = sigmoid(20 * (1 - 0.95))
    assert bound == pytest.approx(0.7310586, abs=1e-6)
    p = torch.linspace(0, 1, 1001, dtype=torch.float64)
    pi = prune_prob(p)
    assert pi.max().item() <= bound + 1e-12
    assert pi[-1].item() == pytest.approx(bound, abs=1e-12)
    assert torch.all(pi[1:] > pi[:-1])
    assert prune_prob(t64(0.52)).item() == pytest.approx(sigmoid(20 * (0.52 - 0.95)), abs=1e-12)


def test_prune_prob_custom_k_c0():
    assert prune_prob(t64(0.3), k=10, c0=0.5).item() == pytest.approx(sigmoid(-2.0), abs=1e-12)


# --------------------------------------------------------------------------- hard keep


def test_hard_keep_boundary():
    pi = torch.tensor([0.0, 0.4999, 0.5, 0.5001, 1.0])
    keep = hard_keep(pi)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, True, False, False, False]


def test_hard_keep_is_p_below_c0():
    p = t64(0.1, 0.9, 0.949, 0.951, 0.99, 1.0)
    assert hard_keep(prune_prob(p)).tolist() == (p < 0.95).tolist()


# --------------------------------------------------------------------------- soft keep


def test_soft_keep_shape_range_and_seed():
    pi = torch.full((3, 5), 0.3)
    a = soft_keep(pi, generator=torch.Generator().manual_seed(1))
    b = soft_keep(pi, generator=torch.Generator().manual_seed(1))
    c = soft_keep(pi, generator=torch.Generator().manual_seed(2))
    assert a.shape == pi.shape and a.dtype == pi.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all((a > 0) & (a < 1))


@pytest.mark.parametrize("pi0", [0.05, 0.2, 0.5, 0.73])
def test_soft_keep_gumbel_max_property(pi0):
    # P(keep component wins) = 1 - pi, whatever the temperature
    g = torch.Generator().manual_seed(0)
    for tau in (0.5, 2.0):
        m = soft_keep(torch.full((200_000,), pi0, dtype=torch.float64), tau=tau, generator=g)
        assert (m > 0.5).double().mean().item() == pytest.approx(1 - pi0, abs=0.005)


def test_soft_keep_mean_decreases_with_pi():
    g = torch.Generator().manual_seed(0)
    pis = [0.01, 0.1, 0.2, 0.4, 0.6, 0.73]
    means = [soft_keep(torch.full((100_000,), p), generator=g).mean().item() for p in pis]
    assert all(a > b + 0.01 for a, b in zip(means, means[1:]))
    assert 0.6 < means[2] < 0.85  # pi = 0.2 at tau 0.5: a soft keep of about 0.78


def test_soft_keep_low_temperature_is_binary():
    g = torch.Generator().manual_seed(0)
    pi = torch.full((50_000,), 0.3, dtype=torch.float64)
    cold = soft_keep(pi, tau=1e-3, generator=g)
    warm = soft_keep(pi, tau=0.5, generator=g)
    undecided = lambda m: ((m > 0.01) & (m < 0.99)).double().mean().item()  # noqa: E731
    assert undecided(cold) < 0.01
    assert undecided(warm) > 0.2


def test_soft_keep_gradient_finite_and_nonpositive():
    pi = torch.tensor([0.0, 1e-3, 0.2, 0.5, 0.73, 1.0], requires_grad=True)
    m = soft_keep(pi, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(m).all()
    m.sum().backward()
    assert torch.isfinite(pi.grad).all()
    assert torch.all(pi.grad[1:5] < 0)  # more likely pruned -> smaller keep
    assert m[0] > 0.99 and m[-1] < 0.01


def test_soft_keep_rejects_bad_tau():
    with pytest.raises(ValueError):
        soft_keep(torch.tensor([0.2]), tau=0.0)


# --------------------------------------------------------------------------- regulariser


def test_regularizer_value_and_gradient():
    gamma = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    r = scp_regularizer(gamma, beta, s=2.0)
    assert r.item() == pytest.approx((0.1 + 2 * 0.5) + (-0.3 + 2 * 1.0), abs=1e-12)
    r.backward()
    assert beta.grad.tolist() == [1.0, 1.0]
    assert gamma.grad.tolist() == [2.0, -2.0]  # descent shrinks |gamma|, lowers beta
    with torch.no_grad():  # one descent step raises p
        p0 = deactivation_prob(gamma, beta)
        p1 = deactivation_prob(gamma - 0.01 * gamma.grad, beta - 0.01 * beta.grad)
    assert torch.all(p1 > p0)


def test_regularizer_weighted():
    gamma = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    w = t64(1.0, 3.0)
    r = scp_regularizer(gamma, beta, s=2.0, weight=w)
    assert r.item() == pytest.approx(1.1 + 3 * 1.7, abs=1e-12)
    r.backward()
    assert beta.grad.tolist() == [1.0, 3.0]
    assert gamma.grad.tolist() == [2.0, -6.0]
    assert scp_regularizer(gamma, beta, s=0.5).item() == pytest.approx(0.1 + 0.25 - 0.3 + 0.5)


# --------------------------------------------------------------------------- groups, gates


def test_combine_sites_product_and_gradient():
    a = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    b = t64(0.4, 0.9, 0.7)
    c = t64(0.5, 1.0, 1.0)
    p = combine_sites([a, b, c])
    assert p.tolist() == pytest.approx([0.1, 0.9, 0.0])
    p.sum().backward()
    assert a.grad.tolist() == pytest.approx([0.2, 0.9, 0.7])
    assert torch.equal(combine_sites([b]), b)
    with pytest.raises(ValueError):
        combine_sites([])


def test_gate_prob_and_init():
    assert gate_prob(torch.tensor(0.0)).item() == 0.5
    logit = gate_init_logit()
    assert gate_prob(torch.tensor(logit, dtype=torch.float64)).item() == pytest.approx(scp.GATE_INIT_PI)
    assert scp.GATE_INIT_PI < 0.5
    gates = torch.full((8,), logit, requires_grad=True)
    assert hard_keep(gate_prob(gates)).all()  # every gated channel starts kept
    gate_prob(gates).sum().backward()
    assert torch.all(gates.grad > 0.04)  # and learnable
    assert gate_prob(torch.tensor(gate_init_logit(0.9))).item() == pytest.approx(0.9)
    with pytest.raises(ValueError):
        gate_init_logit(1.0)


# --------------------------------------------------------------------------- log space


SILU_T = -4.4853  # silu(t) = -0.05 on the left tail (t * sigmoid(t) = -0.05, solved by bisection)


def test_silu_threshold_by_hand():
    assert SILU_T * sigmoid(SILU_T) == pytest.approx(-0.05, abs=2e-4)


def test_log_deactivation_matches_log_p_and_stays_finite():
    gamma, beta = t64(1.0, 0.5, 0.3, 2.0), t64(0.0, -1.0, 0.5, -3.0)  # z = -4.4, -6.9, -16.4, -0.7
    logp = log_deactivation_prob(gamma, beta, t=SILU_T)
    expected = [math.log(phi((SILU_T + 0.05 - b) / (1e-8 + g))) for g, b in zip(gamma.tolist(), beta.tolist())]
    assert logp.tolist() == pytest.approx(expected, rel=1e-9)
    # float32: p underflows to 0 for a live channel behind SiLU, log p does not
    g32, b32 = torch.tensor([0.1, 0.2]), torch.tensor([1.0, 0.5])
    assert deactivation_prob(g32, b32, t=SILU_T).tolist() == [0.0, 0.0]
    lp = log_deactivation_prob(g32, b32, t=SILU_T)
    assert torch.isfinite(lp).all() and lp[0] < lp[1] < -300  # z = -54.3 and -24.7
    # per-entry thresholds (a tensor t) give the same as one call per threshold
    ts = torch.tensor([0.0, SILU_T], dtype=torch.float64)
    both = log_deactivation_prob(t64(0.5, 0.5), t64(0.2, 0.2), t=ts)
    assert both[1].item() == pytest.approx(log_deactivation_prob(t64(0.5), t64(0.2), t=SILU_T).item())


def test_bn_silu_channel_scored_dead():
    """beta = -6, gamma = 0.1 behind SiLU: BN output N(-6, 0.01), SiLU of it ~ -0.015: dead."""
    logp = log_deactivation_prob(torch.tensor([0.1]), torch.tensor([-6.0]), t=SILU_T)
    p = torch.exp(logp)
    assert p.item() == pytest.approx(1.0, abs=1e-6)
    assert not hard_keep(prune_prob(p)).item()
    assert keep_score(logp).item() < 1e-6


def test_live_silu_channels_do_not_tie():
    """Live channels whose float32 ``p`` is 0 (and ``1 - p`` rounds to 1 in float64) keep their
    order: keep_score ranks them by log p, as the exact float64 values do."""
    gamma = torch.tensor([0.5, 0.4, 0.3, 0.25, 0.2, 1.0])
    beta = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.5, 2.0])
    score = keep_score(log_deactivation_prob(gamma, beta, t=SILU_T))
    assert (1.0 - deactivation_prob(gamma, beta, t=SILU_T).double() == 1.0).all()  # the old score: all tied
    assert len(set(score.tolist())) == len(score)
    exact = log_deactivation_prob(gamma.double(), beta.double(), t=SILU_T)
    assert torch.equal(torch.argsort(score), torch.argsort(-exact))
    assert (score <= 1.0 + 1e-9).all() and (score > 1.0 - 1e-12).all()


def test_keep_score_is_one_minus_p_where_p_is_resolved():
    logp = torch.log(t64(0.5, 0.95, 0.01))
    assert keep_score(logp).tolist() == pytest.approx([0.5, 0.05, 0.99], abs=1e-9)
    assert keep_score(torch.tensor([-math.inf])).item() == pytest.approx(1.0, abs=1e-8)


def test_combine_log_sites_is_log_of_product():
    a, b = t64(0.5, 0.9), t64(0.4, 0.2)
    logp = torch.log(torch.cat([a, b]))
    flat = torch.tensor([0, 1, 0, 1])
    got = combine_log_sites(logp, flat, 3)
    assert torch.exp(got[:2]).tolist() == pytest.approx(combine_sites([a, b]).tolist())
    assert got[2].item() == 0.0  # no site: p = 1 is never read (gates replace it)


def test_gate_regularizer_value_and_pull():
    logit = torch.tensor([gate_init_logit(), 0.0, 5.0], dtype=torch.float64, requires_grad=True)
    w = t64(1.0, 2.0, 1.0)
    r = gate_regularizer(logit, w)
    expected = sum(wi * -math.log(sigmoid(li)) for wi, li in zip(w.tolist(), logit.tolist()))
    assert r.item() == pytest.approx(expected, rel=1e-12)
    r.backward()
    pi = torch.sigmoid(logit.detach())
    assert logit.grad.tolist() == pytest.approx((-w * (1 - pi)).tolist(), rel=1e-9)
    # at the initial gate the pull is 0.95 w: 20x the old ``1 - pi`` term's pi (1 - pi) = 0.0475
    assert -logit.grad[0].item() > 0.9
