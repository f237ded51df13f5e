"""The math of Operation-Aware Soft Channel Pruning (SCP; Kang & Han, ICML 2020).

Each formula is one small differentiable function on tensors, so the training loop, the
one-shot ranking and the tests all use the same code. See DESIGN.md section 4.

Per BN channel c (scale ``gamma``, shift ``beta``) that feeds a rectifier whose zero
region is ``x <= t``:

    p_c   = Phi((t + eps - beta_c) / (1e-8 + |gamma_c|))   deactivation probability
    pi_c  = sigmoid(k * (p_c - c0))                        prune probability
    m_c   = keep component of Gumbel-softmax([1 - pi_c, pi_c], tau)   soft mask
    keep  = pi_c < 0.5                                     hard rule (eval, decision)
    R     = sum_c (beta_c + s * |gamma_c|)                 regulariser (times lambda)

A group with several BN-rectifier sites uses ``p = prod_s p_s``; a group with none uses a
learned gate ``pi = sigmoid(logit)`` whose regulariser is ``-log pi`` (``gate_regularizer``).

``t`` is the activation's dead threshold (registry: ReLU 0, Hardswish -3, SiLU about -4.5,
GELU about -2.0). With ``t`` that low a live channel's ``p`` underflows float32, so sites are
combined in log space (``log_deactivation_prob``, ``combine_log_sites``) and rankings use
``keep_score(log_p)``; ``pi`` and the hard rule read ``p = exp(log_p)``, which is exact
where they can change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCPConfig",
    "GATE_INIT_PI",
    "rectifier_threshold",
    "deactivation_prob",
    "prune_prob",
    "soft_keep",
    "hard_keep",
    "scp_regularizer",
    "combine_sites",
    "log_deactivation_prob",
    "combine_log_sites",
    "keep_score",
    "gate_prob",
    "gate_regularizer",
    "gate_init_logit",
    "gate_init_spread",
    "log_either_prunes",
]

@dataclass(frozen=True)
class SCPConfig:
    """Hyper-parameters of SCP, with the paper's values as defaults.

    eps: margin added to the rectifier threshold in ``deactivation_prob``.
    k, c0: slope and centre of ``prune_prob``; the hard rule keeps iff ``p < c0``.
    tau: Gumbel-softmax temperature of ``soft_keep``.
    s: weight of ``|gamma|`` against ``beta`` in ``scp_regularizer``.
    delta: a smooth activation's dead threshold ``t`` solves ``|f(t)| = delta`` on its left
        tail (the op registry's ``dead_threshold``); exact zero regions ignore it.
    s_smooth: ``s`` for BN sites in front of a smooth activation (SiLU, GELU, ...). Why 0:
        there ``t + eps - beta < 0`` for a live channel, so shrinking ``|gamma|`` lowers p,
        and SiLU/GELU are near-linear at 0, so the next layer undoes the shrink for free:
        with s = 2 every channel became a constant, beta then fell unopposed and all 15
        sites of the digits SiLU ResNet died within 2 epochs (hard cut 1.0, 10% accuracy).
    smooth_lever: where the budget pushes a channel scored by a smooth activation's BN site.
        ``"gate"`` (default): a learned gate per channel, pulled by ``gate_regularizer``; the
        channel is pruned when its gate or its BN site says so (``log_either_prunes``), and
        beta/gamma are not regularised. ``"bn"``: the paper's pull on beta (``s_smooth``).
        Why gates: a smooth tail is free to slide along. SiLU(beta + gamma x) for beta << 0
        is about ``e^beta`` times a shape set by gamma, and the next BN rescales it away, so
        the loss cannot resist a pull on beta: on digits' SiLU ResNet the pull slid every
        channel together (median beta of the kept ones 0 -> -3.7) before the first crossed
        t = -4.49, and the pruned net lost 9.4 points; with gates 0.3 (BENCHMARKS.md 10). A
        gate's mask is dropout the loss does see, so the channels it needs resist. An exact
        zero region (ReLU, Hardswish) has no such slide: moving beta sparsifies the channel.
    gate_spread: half-width, in logits, of the spread of a group's initial gate logits around
        ``gate_init_logit()`` (``gate_init_spread``; every gate still starts kept). Why: gates of a
        group that start equal take equal pulls (the loss barely tells them apart while they keep
        their channel), so they cross 0.5 together and empty the group in one epoch.
    silence_revived: when finalize's rounding keeps a channel whose gate training closed, set its
        BN sites' gamma and beta to 0 in the pruned model (where the activation gives 0 at 0), so
        it outputs 0 as its mask made it in training (``bnsites.silenced``). Why: its consumers
        were trained without it; on digits' GELU ResNet its stale output cost 1-6 points.
    straight_through: a gated channel's training mask is the hard rule (0/1) forward and the soft
        mask's gradient backward. Why: gates settle where the loss resists the pull, near pi = 0.5,
        where the Gumbel sample flips from forward to forward; BN running statistics then average
        over architectures the eval-mode hard rule never runs (digits' GELU ResNet: masked model
        46% in eval, 99.4% with batch statistics, 100% after recalibrating them; BENCHMARKS.md 10).
    order_live_gates: finalize orders the channels its gates keep by their consumers' weight L1
        (``pruner._order_live_gates``) where the rounding must cut some of them; a kept gate's pi
        (saturated) ordered them by noise, and on digits' SiLU ResNet cut the most needed ones.
    """

    eps: float = 0.05
    k: float = 20.0
    c0: float = 0.95
    tau: float = 0.5
    s: float = 2.0
    delta: float = 0.05
    s_smooth: float = 0.0
    smooth_lever: str = "gate"
    gate_spread: float = 0.0
    silence_revived: bool = True
    straight_through: bool = True
    order_live_gates: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.c0 < 1.0:
            raise ValueError(f"SCPConfig.c0 must be in (0, 1), got {self.c0}")
        if self.k <= 0 or self.tau <= 0:
            raise ValueError(f"SCPConfig.k and tau must be > 0, got k={self.k}, tau={self.tau}")
        if self.eps < 0 or self.s < 0 or self.s_smooth < 0:
            raise ValueError(f"SCPConfig.eps and s must be >= 0, got eps={self.eps}, s={self.s}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"SCPConfig.delta must be in (0, 1), got {self.delta}")
        if not 0.0 <= self.gate_spread < -gate_init_logit():
            raise ValueError(f"SCPConfig.gate_spread must be in [0, {-gate_init_logit():.3f}) (every gate starts "
                             f"kept), got {self.gate_spread}")
        if self.smooth_lever not in ("gate", "bn"):
            raise ValueError(f"SCPConfig.smooth_lever must be 'gate' or 'bn', got {self.smooth_lever!r}")


# --------------------------------------------------------------------------- rectifiers

def rectifier_threshold(module_or_fn: Any) -> Optional[float]:
    """Upper end ``t`` of a rectifier's exact zero region ``x <= t``, or None if it has none
    (a thin wrapper over the op registry's ``exact_zero_threshold``; smooth activations'
    thresholds come from ``registry.dead_threshold``).

    Accepts a module instance or class, a function, or a ``call_method`` name:

        ReLU, ReLU6 (module, class, F.relu, F.relu6, torch.relu, "relu")  -> 0.0
        Hardswish, Hardsigmoid (module, class, F.hardswish)                -> -3.0
        anything else (SiLU, GELU, LeakyReLU, Hardtanh, ...)               -> None

    >>> rectifier_threshold(nn.ReLU()), rectifier_threshold(F.hardswish)
    (0.0, -3.0)
    >>> rectifier_threshold(nn.SiLU()) is None
    True
    """
    from softprune_fx.passes.ops import exact_zero_threshold  # the registry, with every family loaded
    return exact_zero_threshold(module_or_fn)


# --------------------------------------------------------------------------- probabilities


def deactivation_prob(gamma: Tensor, beta: Tensor, t: float = 0.0, eps: float = 0.05) -> Tensor:
    """Probability that the rectifier zeroes channel c: ``Phi((t + eps - beta) / (1e-8 + |gamma|))``.

    BN output is modelled as N(beta, gamma^2); ``Phi`` is the standard normal CDF
    (``torch.special.ndtr``). ``gamma = 0`` gives 0, 0.5 or 1 with a finite gradient.

    >>> deactivation_prob(torch.tensor([0.1]), torch.tensor([-0.2]))  # Phi(2.5)
    tensor([0.9938])
    """
    return torch.special.ndtr((t + eps - beta) / (1e-8 + gamma.abs()))


def log_deactivation_prob(gamma: Tensor, beta: Tensor, t: Any = 0.0, eps: float = 0.05) -> Tensor:
    """``log p`` of ``deactivation_prob`` by ``torch.special.log_ndtr``: finite where ``p``
    underflows (float32 ``Phi(z)`` is 0 below z = -13.2, reached by a live channel
    behind SiLU, t = -4.5). ``t`` may be a tensor of per-entry thresholds.

    >>> round(float(log_deactivation_prob(torch.tensor([0.1]), torch.tensor([1.0]), t=-4.5)))  # log Phi(-54.5)
    -1490
    """
    z = (t + eps - beta) / (1e-8 + gamma.abs())
    # clamped: log_ndtr's backward is NaN far out (z = -7.5e5, a Hardswish channel whose gamma
    # the s = 2 pull took to -3.5e-6 with beta above t: mobilenetv3's NaN collapse to a 100% cut);
    # beyond |z| = 1000 keep_score ties channels anyway (q / (1 + q) no longer resolves)
    return torch.special.log_ndtr(z.clamp(-Z_CLAMP, Z_CLAMP))


Z_CLAMP = 1000.0


def combine_log_sites(log_p: Tensor, flat: Tensor, size: int) -> Tensor:
    """``log prod_s p_s`` per flat channel: entry i of ``log_p`` (one BN-site channel) adds
    to channel ``flat[i]``; a channel with no entry gets 0 (``combine_sites`` in log space).

    >>> combine_log_sites(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([0, 0, 2]), 3)
    tensor([-3.0000,  0.0000, -0.5000])
    """
    out = torch.zeros(size, dtype=log_p.dtype, device=log_p.device)
    return out.index_add(0, flat.to(log_p.device), log_p)


def keep_score(log_p: Tensor) -> Tensor:
    """Ranking score of a BN-scored channel (higher = keep): ``1 - p`` in float64, plus
    ``1e-9 * q / (1 + q)`` with ``q = -log p``, which orders the channels whose ``1 - p``
    rounds to 1 (all the live ones behind SiLU) by ``log p`` without moving any score by
    more than 1e-9 (the decision weighs score sums, so the magnitude stays ``1 - p``).

    >>> s = keep_score(torch.tensor([-40.0, -60.0, -0.05]))
    >>> bool(s[1] > s[0] > s[2]), round(float(s[2]), 4)
    (True, 0.0488)
    """
    q = (-log_p.double()).clamp(0.0, 1e300)  # log p = -inf (p = 0) scores 1 + 1e-9, not nan
    return -torch.expm1(-q) + 1e-9 * q / (1.0 + q)


def prune_prob(p: Tensor, k: float = 20.0, c0: float = 0.95) -> Tensor:
    """Prune probability ``pi = sigmoid(k * (p - c0))``.

    ``pi = 0.5`` exactly at ``p = c0``; since ``p <= 1``, ``pi <= sigmoid(k * (1 - c0))``
    (0.731 with the defaults), so a dead channel still has soft keep probability 0.27.

    >>> prune_prob(torch.tensor([0.95, 1.0]))
    tensor([0.5000, 0.7311])
    """
    return torch.sigmoid(k * (p - c0))


def combine_sites(ps: Sequence[Tensor]) -> Tensor:
    """Deactivation probability of a group with several BN-rectifier sites: ``prod_s p_s``.

    A channel counts as dead only when every site zeroes it (the sites are treated as
    independent).

    >>> combine_sites([torch.tensor([0.5, 1.0]), torch.tensor([0.4, 0.9])])
    tensor([0.2000, 0.9000])
    """
    if len(ps) == 0:
        raise ValueError("combine_sites needs at least one site")
    return reduce(torch.mul, ps)


GATE_INIT_PI = 0.05
"""Initial prune probability of a learned gate: small, so every gated channel starts kept
(``hard_keep``) and the soft mask drops about 5% of samples, while ``d pi / d logit =
pi (1 - pi) = 0.0475`` stays large enough for the budget to move the logit."""


def gate_init_logit(pi0: float = GATE_INIT_PI) -> float:
    """Logit that makes ``gate_prob`` start at ``pi0``: ``log(pi0 / (1 - pi0))``.

    Initialise a gate parameter with ``torch.full((C,), gate_init_logit())``.

    >>> round(gate_init_logit(0.05), 4)
    -2.9444
    """
    if not 0.0 < pi0 < 1.0:
        raise ValueError(f"gate initial pi must be in (0, 1), got {pi0}")
    return math.log(pi0) - math.log1p(-pi0)


def gate_init_spread(n: int, spread: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Initial logits of one group's ``n`` gates: ``gate_init_logit() + spread * u``, ``u`` evenly
    spaced over [-1, 1] in a random order (``generator``), so every gate starts kept (the masked
    model predicts the original) but no two channels of a group start, and so cross, together.

    >>> x = gate_init_spread(3, 1.0, torch.Generator().manual_seed(0))
    >>> [round(v, 4) for v in sorted(x.tolist())], bool((x < 0).all())
    ([-3.9444, -2.9444, -1.9444], True)
    """
    u = torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(n)
    return gate_init_logit() + spread * u[torch.randperm(n, generator=generator)]


def gate_prob(logit: Tensor) -> Tensor:
    """Prune probability of a group without a BN-rectifier site: ``pi = sigmoid(logit)``.

    The logit is a learned per-channel parameter, initialised to ``gate_init_logit()``
    (pi = ``GATE_INIT_PI`` = 0.05: kept by the hard rule); the same soft mask, hard rule
    and decision as BN-scored groups then apply.

    >>> gate_prob(torch.tensor([gate_init_logit(), 0.0]))
    tensor([0.0500, 0.5000])
    """
    return torch.sigmoid(logit)


def log_either_prunes(log_keep_a: Tensor, log_keep_b: Tensor) -> Tensor:
    """``log pi`` of a channel pruned when either of two independent causes prunes it, from
    their log keep probabilities: ``log(1 - (1 - pi_a) (1 - pi_b))``. A smooth-activation
    channel's gate and its BN site combine so (the BN can still kill it by itself).

    >>> round(float(log_either_prunes(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.8))).exp()), 4)
    0.6
    """
    # clamped below 0: at a sum of exactly 0 (both keep surely) the log's gradient is infinite,
    # and torch.where upstream multiplies it by 0 into NaN (mobilenetv3's gates at logit/T < -104)
    return torch.log(-torch.expm1((log_keep_a + log_keep_b).clamp(max=-1e-30)))


def gate_regularizer(logit: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Gate regulariser ``sum_c w_c * (-log pi_c) = sum_c w_c * softplus(-logit_c)``.

    Its pull on a logit is ``w (1 - pi)``: about ``w`` while the gate keeps its channel and
    fading once it prunes, where ``1 - pi`` (the old term) pulled with ``w pi (1 - pi)``,
    0.05 w at the initial pi, too weak to reach a budget. Multiply by lambda outside.

    >>> round(float(gate_regularizer(torch.tensor([0.0, gate_init_logit()]))), 4)  # -log 0.5 - log 0.05
    3.6889
    """
    per_channel = F.softplus(-logit)
    if weight is not None:
        per_channel = weight * per_channel
    return per_channel.sum()


# --------------------------------------------------------------------------- masks


def soft_keep(pi: Tensor, tau: float = 0.5, generator: Optional[torch.Generator] = None) -> Tensor:
    """Soft keep mask: keep component of a Gumbel-softmax sample over ``log([1 - pi, pi])``.

        m = softmax(([log(1 - pi), log(pi)] + [g0, g1]) / tau)[0],   g ~ Gumbel(0, 1)

    One sample per channel (same shape as ``pi``), shared by the whole batch. ``m`` is in
    [0, 1] (strictly inside up to float saturation), decreasing in ``pi``, and
    ``P(m > 0.5) = 1 - pi`` for every tau; as ``tau -> 0`` samples become 0/1.

    >>> g = torch.Generator().manual_seed(0)
    >>> soft_keep(torch.tensor([0.0, 1.0]), generator=g).round()
    tensor([1., 0.])
    """
    if tau <= 0:
        raise ValueError(f"soft_keep needs tau > 0, got {tau}")
    finfo = torch.finfo(pi.dtype)
    p = pi.clamp(finfo.eps, 1.0 - finfo.eps)  # finite logs and gradients at pi in {0, 1}
    logits = torch.stack([torch.log1p(-p), torch.log(p)], dim=-1)
    u = torch.rand(logits.shape, generator=generator, dtype=pi.dtype, device=pi.device)
    gumbel = -torch.log(-torch.log(u.clamp(finfo.tiny, 1.0 - finfo.eps)))
    return F.softmax((logits + gumbel) / tau, dim=-1)[..., 0]


def hard_keep(pi: Tensor) -> Tensor:
    """Hard keep rule: bool tensor ``pi < 0.5`` (equivalently ``p < c0`` for BN sites).

    >>> hard_keep(torch.tensor([0.2, 0.5, 0.7]))
    tensor([ True, False, False])
    """
    return pi < 0.5


# --------------------------------------------------------------------------- regulariser


def scp_regularizer(gamma: Tensor, beta: Tensor, s: float = 2.0,
                    weight: Optional[Tensor] = None) -> Tensor:
    """SCP regulariser ``sum_c w_c * (beta_c + s * |gamma_c|)`` (``w_c = 1`` by default).

    Gradient descent on it lowers beta and shrinks |gamma|, which raises the
    deactivation probability. ``weight`` is a per-channel tensor (e.g. each channel's
    FLOPs share) broadcast against ``gamma``. Multiply by lambda outside.

    >>> scp_regularizer(torch.tensor([0.5, -1.0]), torch.tensor([0.1, -0.3]))
    tensor(2.8000)
    """
    per_channel = beta + s * gamma.abs()
    if weight is not None:
        per_channel = weight * per_channel
    return per_channel.sum()
