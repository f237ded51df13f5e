"""The mask bank: every channel's SCP mask, computed once per forward, and the budget
controller that steers lambda on the cut the hard rule would produce now.

Inputs are the gammas and betas of the BN-rectifier sites (get_attr nodes, so the bank
reads the model's live parameters, under DDP too). Output is a flat vector with one
mask value per channel plus a trailing constant 1:

- training: the Gumbel-softmax keep sample of ``pi`` (one per channel per forward);
  the controller advances, a PI controller on the gap ``target - hard_ratio``:
  ``I += ki * gap`` and ``lambda = I + kp * gap``, both clamped to ``[0, lambda_max]``
  (the clamp on I is the anti-wind-up: an overshoot empties the proportional part at
  once, and the integral cannot store a deficit);
- eval: the hard rule ``pi < 0.5`` (0/1), so the masked model predicts the pruned one.

Example::

    bank = MaskBank(index.size, sites, fixed_keep, cost, target=0.4)
    masks = bank(*bn_params)        # (size + 1,) vector
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .bnsites import BNSite
from .cost import CostModel
from .scp import SCPConfig, gate_init_logit, prune_prob, soft_keep


class MaskBank(nn.Module):
    def __init__(self, size: int, sites: list[BNSite], fixed_keep: np.ndarray, cost: CostModel, target: float,
                 scp: SCPConfig = SCPConfig(), kp: float = 0.005, ki: float = 1e-4, lambda_max: float = 0.05):
        super().__init__()
        self.size, self.scp, self.cost = size, scp, cost
        self.kp, self.ki, self.lambda_max = kp, ki, lambda_max
        self.sites = sites
        ent_flat, ent_t, offs = [], [], []
        start = 0
        for s in sites:
            offs.append(start)
            ent_flat.append(s.flat)
            ent_t.append(np.full(len(s.flat), s.threshold))
            start += len(s.flat)
        self.register_buffer("ent_flat", torch.as_tensor(np.concatenate(ent_flat) if ent_flat else np.zeros(0, int)),
                             persistent=False)
        self.register_buffer("ent_t", torch.as_tensor(np.concatenate(ent_t) if ent_t else np.zeros(0)).float(),
                             persistent=False)
        self._channels = [torch.as_tensor(s.channel) for s in sites]
        has = torch.zeros(size, dtype=torch.bool)
        has[self.ent_flat] = True
        self.register_buffer("has_bn", has, persistent=False)
        self.register_buffer("fixed", torch.as_tensor(fixed_keep, dtype=torch.bool), persistent=False)
        self.gate_logits = nn.Parameter(torch.full((size,), gate_init_logit()))
        self.register_buffer("target", torch.tensor(float(target)))
        self.register_buffer("lam", torch.tensor(0.0))
        self.register_buffer("integral", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("hard_ratio", torch.tensor(0.0))
        self.force_keep = False
        self.last_pi: torch.Tensor | None = None

    # ------------------------------------------------------------------ probabilities
    def gather(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry (gamma, beta) from the site parameters (gamma_0, beta_0, gamma_1, ...)."""
        gam = [params[2 * i][ch.to(params[2 * i].device)] for i, ch in enumerate(self._channels)]
        bet = [params[2 * i + 1][ch.to(params[2 * i + 1].device)] for i, ch in enumerate(self._channels)]
        if not gam:
            z = self.gate_logits.new_zeros(0)
            return z, z
        return torch.cat(gam), torch.cat(bet)

    def deactivation(self, params) -> torch.Tensor:
        """p per channel: the product of its BN sites' deactivation probabilities (for a
        gated channel, its gate's pi). The ranking score of the decision is ``1 - p``."""
        gamma, beta = self.gather(params)
        z = (self.ent_t.to(gamma.dtype) + self.scp.eps - beta) / (1e-8 + gamma.abs())
        logp = torch.log(torch.special.ndtr(z).clamp_min(1e-30))
        logp_flat = torch.zeros(self.size, dtype=logp.dtype, device=logp.device).index_add(0, self.ent_flat, logp)
        p = torch.where(self.has_bn, torch.exp(logp_flat), torch.sigmoid(self.gate_logits).to(logp.dtype))
        return torch.where(self.fixed, torch.zeros_like(p), p)

    def prune_probs(self, params) -> torch.Tensor:
        """pi per channel: SCP's ``sigmoid(k (p - c0))`` of the BN sites, else the learned gate."""
        p = self.deactivation(params)
        pi = torch.where(self.has_bn, prune_prob(p, self.scp.k, self.scp.c0), p)
        return torch.where(self.fixed, torch.zeros_like(pi), pi)

    def forward(self, *params) -> torch.Tensor:
        one = self.gate_logits.new_ones(1)
        if self.force_keep:
            return one.expand(self.size + 1)
        pi = self.prune_probs(params)
        self.last_pi = pi
        if self.training:
            self._advance(pi.detach())
            keep = soft_keep(pi, self.scp.tau)
        else:
            keep = (pi < 0.5).to(pi.dtype)
        return torch.cat([keep, one.to(keep.dtype)])

    # ------------------------------------------------------------------ controller
    @torch.no_grad()
    def _advance(self, pi: torch.Tensor) -> None:
        hard = (pi < 0.5).cpu().numpy()
        ratio = float(self.cost.ratio(hard))
        gap = float(self.target) - ratio
        clamp = lambda v: min(max(v, 0.0), self.lambda_max)  # noqa: E731
        integral = clamp(float(self.integral) + self.ki * gap)
        self.integral.fill_(integral)
        self.lam.fill_(clamp(integral + self.kp * gap))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.lam, 0)
            dist.broadcast(self.integral, 0)
        self.hard_ratio.fill_(ratio)
        self.steps += 1
