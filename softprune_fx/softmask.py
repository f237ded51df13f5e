"""The mask bank: every channel's SCP mask, computed once per forward, and the budget
controller that steers lambda on the cut the hard rule would produce now.

Inputs are the gammas and betas of the BN-activation sites (get_attr nodes, so the bank
reads the model's live parameters, under DDP too). Output is a flat vector with one
mask value per channel plus a trailing constant 1:

- training: the Gumbel-softmax keep sample of ``pi`` (one per channel per forward); the
  controller advances (``Controller``);
- eval: the hard rule ``pi < 0.5`` (0/1), so the masked model predicts the pruned one.

The formulas are scp.py's; this module only gathers the parameters and vectorises them.

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
from .scp import (SCPConfig, combine_log_sites, gate_init_logit, gate_init_spread, hard_keep, keep_score, log_deactivation_prob,
                  log_either_prunes, prune_prob, soft_keep)


class Controller(nn.Module):
    """Dual ascent on lambda for the equality constraint ``hard cut = target``, as a PI
    controller on the gap ``e = setpoint - hard_cut``:

        I      <- clamp(I + (ki + kg |I|) * e),   lambda = clamp(I + kp * e),   clamp to [-lambda_max / 2, lambda_max]

    Why each part: the plant (SGD on beta, gamma, gate logits) integrates lambda, so the
    proportional term is the damping; the clamp on I is the anti-wind-up; lambda may go
    negative (an equality constraint's multiplier has no sign); the ``kg |I|`` part makes the
    integral geometric, so it finds the lambda a net needs whatever its scale (digits ReLU
    holds at ~0.005, SiLU, whose channels must travel to beta < -4.5, needs ~10x that), which pushes beta and the
    gate logits back up and revives the least-dead channels after an overshoot, where a
    ReLU channel's own loss gradient cannot (a dead ReLU passes none). The setpoint ramps
    from 0 to the target over ``ramp`` steps (two fifths of ``total_steps`` when known: the cut
    lags the setpoint, and lands by about two thirds of the run; with half, resnet_bottleneck's
    240-step run reached 0.387 of 0.4), so
    the cut is approached from below rather than overshot. All state is in buffers: the
    masked model's ``state_dict`` carries it through checkpoints.

    ``temperature()`` anneals the learned gates' ``pi = sigmoid(logit / T)`` from 1 to
    ``T_MIN`` over the half-ramp after the ramp: the hard rule (logit < 0) is unchanged, but
    a gate that prunes is then off in (nearly) every training forward, so the network trains
    as the pruned one will run (without it, a gate at pi 0.6 still passes its channel in 40%
    of the forwards, and the pruned net lost 6.7 points on digits' ConvNeXt).
    """

    T_MIN = 0.1
    BRAKE = 0.1
    STALL_GAP = 0.005   # a stalled cut: short by over half a point, and no half point gained ...
    STALL_GAIN = 0.1    # ... makes the integral grow 10% a step (x2 in 7 steps) until it moves
    NO_PUSH = float("-inf")  # ``base`` when no push is on (outside any clamp; NaN would not compare equal)

    def __init__(self, target: float, kp: float, ki: float, lambda_max: float, ramp: int,
                 total_steps: int | None = None, kg: float = 0.05):
        super().__init__()
        self.kp, self.ki, self.kg, self.lambda_max = kp, ki, kg, lambda_max
        self.register_buffer("target", torch.tensor(float(target)))
        self.register_buffer("ramp", torch.tensor(int(ramp if not total_steps else max(1, 2 * total_steps // 5))))
        self.register_buffer("lam", torch.tensor(0.0))
        self.register_buffer("integral", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("hard_ratio", torch.tensor(0.0))
        self.register_buffer("progress", torch.tensor(0.0))
        self.register_buffer("speed", torch.tensor(0.0))
        self.register_buffer("mark", torch.tensor(0.0))    # the hard cut when ``stalled`` last reset
        self.register_buffer("stalled", torch.tensor(0, dtype=torch.long))  # steps without half a point gained
        self.register_buffer("base", torch.tensor(self.NO_PUSH))  # the integral before a stall's push

    def temperature(self) -> float:
        ramp = max(1, int(self.ramp))
        done = min(max((int(self.steps) - ramp) / (0.5 * ramp), 0.0), 1.0)
        return 1.0 - (1.0 - self.T_MIN) * done

    def setpoint(self) -> float:
        return float(self.target) * min(1.0, (int(self.steps) + 1) / max(1, int(self.ramp)))

    @torch.no_grad()
    def advance(self, ratio: float, progress: float) -> None:
        """One training step: ``ratio`` is the hard-rule cut now, ``progress`` the cut weighted
        by how near death each channel is in log space (``MaskBank.progress``), which moves
        while the hard cut still sits still (SiLU channels travel beta 0 -> -4.5 first)."""
        gap = self.setpoint() - ratio
        clamp = lambda v: min(max(v, -0.5 * self.lambda_max), self.lambda_max)  # noqa: E731
        speed = 0.9 * float(self.speed) + 0.1 * (progress - float(self.progress)) if int(self.steps) else 0.0
        self.speed.fill_(speed)
        self.progress.fill_(progress)
        integral = float(self.integral)
        # hold: the channels are already on their way and would close the gap within a
        # ramp at this speed; integrating on would wind lambda up during the dead time and
        # every channel would then cross at once (SiLU digits: hard cut 0 -> 0.87 -> 0.99 -> 0)
        # After the ramp, a cut more than half a point short that has gained less than half a
        # point for an eighth of a ramp ends the hold, and the integral grows geometrically
        # until the cut moves: the creep the hold waits for is not closing the gap
        # (bench_controller: glu sat 1.1 points short for 100 steps, eco_yolo crept 3 short)
        if ratio >= float(self.mark) + self.STALL_GAP or gap <= 0:
            self.mark.fill_(ratio)
            self.stalled.zero_()
            if gap <= 0 and float(self.base) != self.NO_PUSH:  # the push got the cut there: the
                integral = min(integral, float(self.base))  # wound-up pull must not carry it on
                self.base.fill_(self.NO_PUSH)
        else:
            self.stalled += 1
        stalled = (int(self.steps) >= int(self.ramp) and gap > self.STALL_GAP
                   and int(self.stalled) >= max(1, int(self.ramp) // 8))
        if stalled or not (gap > 0 and speed > 0 and gap < float(self.ramp) * speed):
            integral += (self.ki + self.kg * abs(integral)) * gap
        if stalled:
            if float(self.base) == self.NO_PUSH:
                self.base.fill_(integral)
            integral += self.STALL_GAIN * max(abs(integral), self.ki)
        if gap < -0.01 and speed > 0:  # past the target and still moving deeper: brake
            integral *= 1.0 - self.BRAKE
        integral = clamp(integral)
        self.integral.fill_(integral)
        self.lam.fill_(clamp(integral + self.kp * gap))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.lam, 0)
            dist.broadcast(self.integral, 0)
        self.hard_ratio.fill_(ratio)
        self.steps += 1


class MaskBank(nn.Module):
    def __init__(self, size: int, sites: list[BNSite], fixed_keep: np.ndarray, cost: CostModel, target: float,
                 scp: SCPConfig = SCPConfig(), kp: float = 0.15, ki: float = 5e-3, lambda_max: float = 0.2,
                 ramp: int = 100, total_steps: int | None = None, exact: np.ndarray | None = None,
                 floors: list | None = None):
        super().__init__()
        self.size, self.scp, self.cost = size, scp, cost
        self.sites = sites
        flat = [s.flat for s in sites]
        ts = [np.full(len(s.flat), s.threshold) for s in sites]
        exact = np.ones(len(sites), bool) if exact is None else exact
        ss = [np.full(len(s.flat), scp.s if ex else scp.s_smooth) for s, ex in zip(sites, exact)]
        self.register_buffer("ent_flat", torch.as_tensor(np.concatenate(flat) if flat else np.zeros(0, int)),
                             persistent=False)
        self.register_buffer("ent_t", torch.as_tensor(np.concatenate(ts) if ts else np.zeros(0)).float(),
                             persistent=False)
        self.register_buffer("ent_s", torch.as_tensor(np.concatenate(ss) if ss else np.zeros(0)).float(),
                             persistent=False)  # the regulariser's s per entry (s_smooth behind SiLU/GELU)
        self._channels = [torch.as_tensor(s.channel) for s in sites]
        has = torch.zeros(size, dtype=torch.bool)
        has[self.ent_flat] = True
        self.register_buffer("has_bn", has, persistent=False)
        # the BN lever: entries whose beta/gamma the regulariser pulls (exact zero regions, and
        # smooth ones with smooth_lever="bn"); a channel with such an entry is ``scored``, every
        # other free channel has a gate (a smooth site's p then adds to the gate's pi)
        lever = [np.full(len(s.flat), bool(ex) or scp.smooth_lever == "bn") for s, ex in zip(sites, exact)]
        self.register_buffer("ent_lever", torch.as_tensor(np.concatenate(lever) if lever else np.zeros(0, bool)),
                             persistent=False)
        scored = torch.zeros(size, dtype=torch.bool)
        scored[self.ent_flat[self.ent_lever]] = True
        self.register_buffer("scored", scored, persistent=False)
        self.register_buffer("fixed", torch.as_tensor(fixed_keep, dtype=torch.bool), persistent=False)
        self._init_floors(size, floors or [])
        self.gate_logits = nn.Parameter(self._initial_logits(size, floors or [], scp.gate_spread))
        self.register_buffer("logp0", torch.zeros(size))  # z = Phi^-1(p) at the first training step (progress)
        self.controller = Controller(target, kp, ki, lambda_max, ramp, total_steps)
        self.force_keep = False
        self.last_pi: torch.Tensor | None = None

    @property
    def lam(self) -> torch.Tensor:
        return self.controller.lam

    @property
    def hard_ratio(self) -> torch.Tensor:
        return self.controller.hard_ratio

    @property
    def steps(self) -> torch.Tensor:
        return self.controller.steps

    def _init_floors(self, size: int, floors: list) -> None:
        """``floors``: (flat ids, least count) per group: the hard rule keeps at least that many."""
        width = max((len(f[0]) for f in floors), default=0)
        table = np.full((len(floors), width), size, dtype=np.int64)  # padding points past the end
        for i, f in enumerate(floors):
            table[i, :len(f[0])] = f[0]
        self.register_buffer("floor_ids", torch.as_tensor(table), persistent=False)
        self.register_buffer("floor_n", torch.as_tensor([min(int(n), len(ids)) for ids, n in floors],
                                                        dtype=torch.long), persistent=False)

    @staticmethod
    def _initial_logits(size: int, floors: list, spread: float) -> torch.Tensor:
        """Every gate at ``gate_init_logit()``, each group's spread by ``gate_init_spread`` (a fixed
        generator: the same start on every DDP rank, and the user's random stream untouched)."""
        logits = torch.full((size,), gate_init_logit())
        if spread > 0:
            gen = torch.Generator().manual_seed(0)
            for ids, _ in floors:
                logits[torch.as_tensor(ids)] = gate_init_spread(len(ids), spread, gen)
        return logits

    def floor(self, pi: torch.Tensor) -> torch.Tensor:
        """``pi`` with a group's lowest-pi channels forced kept (pi = 0) where the hard rule would
        keep fewer than its floor (the decision's ``min_width``). Why: gates of a group start equal
        and take equal pulls, so they cross 0.5 together; on digits' SiLU ResNet the whole stem
        stream (16 of 16) died in one epoch and accuracy fell to 10%, past recovery (a closed gate
        passes no gradient at the annealed temperature). The decision never empties a group, so
        neither may the hard rule the network trains towards. (Rounding each group up to the
        decision's rounding step here as well made the digits cut cycle between 0.38 and 0.46:
        one step of a 32-wide group is 8 points of FLOPs; BENCHMARKS.md section 10.)"""
        if not len(self.floor_n):
            return pi
        padded = torch.cat([pi.detach(), pi.new_full((1,), float("inf"))])[self.floor_ids]
        short = (padded < 0.5).sum(1) < self.floor_n
        if not bool(short.any()):
            return pi
        order = padded.argsort(1)
        take = (torch.arange(padded.shape[1], device=pi.device)[None, :] < self.floor_n[:, None]) & short[:, None]
        ids = self.floor_ids.gather(1, order)[take]
        protect = torch.zeros(self.size + 1, dtype=torch.bool, device=pi.device)
        protect[ids] = True
        return torch.where(protect[:-1], torch.zeros_like(pi), pi)

    # ------------------------------------------------------------------ probabilities
    def gather(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry (gamma, beta) from the site parameters (gamma_0, beta_0, gamma_1, ...)."""
        gam = [params[2 * i][ch.to(params[2 * i].device)] for i, ch in enumerate(self._channels)]
        bet = [params[2 * i + 1][ch.to(params[2 * i + 1].device)] for i, ch in enumerate(self._channels)]
        if not gam:
            z = self.gate_logits.new_zeros(0)
            return z, z
        return torch.cat(gam), torch.cat(bet)

    def gates(self) -> torch.Tensor:
        """Channels with a learned gate: no BN lever (no BN-activation site, or only smooth
        ones with ``smooth_lever="gate"``), not frozen."""
        return ~self.scored & ~self.fixed

    def log_deactivation(self, params) -> torch.Tensor:
        """log p per scored channel: the sum of its BN sites' log deactivation probabilities;
        for a gated channel ``log pi``: its gate's, or with smooth BN sites, gate or sites
        prune it (``log_either_prunes``); for a frozen one, -inf."""
        gamma, beta = self.gather(params)
        logp = log_deactivation_prob(gamma, beta, self.ent_t.to(gamma.dtype), self.scp.eps)
        logp = combine_log_sites(logp, self.ent_flat, self.size)
        t = self.controller.temperature()
        gate = nn.functional.logsigmoid(self.gate_logits / t).to(logp.dtype)
        site_keep = torch.log1p(-prune_prob(torch.exp(logp), self.scp.k, self.scp.c0))
        gate_keep = nn.functional.logsigmoid(-self.gate_logits / t).to(logp.dtype)
        gate = torch.where(self.has_bn, log_either_prunes(gate_keep, site_keep), gate)
        logp = torch.where(self.scored, logp, gate)
        return torch.where(self.fixed, torch.full_like(logp, -torch.inf), logp)

    def prune_probs(self, params) -> torch.Tensor:
        """pi per channel: SCP's ``sigmoid(k (p - c0))`` of the BN sites, else the learned gate."""
        logp = self.log_deactivation(params)
        p = torch.exp(logp)
        return self.floor(torch.where(self.scored, prune_prob(p, self.scp.k, self.scp.c0), p))

    def scores(self, params) -> np.ndarray:
        """The decision's ranking scores (higher = keep), float64, ``inf`` for frozen channels.
        A gated channel with smooth BN sites adds ``1e-10 q / (1 + q)``, ``q = -log p`` of
        its sites: equal gates (untrained) are then ordered by the BN, as scored ones are."""
        with torch.no_grad():
            score = keep_score(self.log_deactivation(params).cpu())
            gamma, beta = self.gather(params)
            logp = log_deactivation_prob(gamma, beta, self.ent_t.to(gamma.dtype), self.scp.eps)
            q = (-combine_log_sites(logp, self.ent_flat, self.size).double().cpu()).clamp(0.0, 1e300)
        score = torch.where((self.has_bn & ~self.scored).cpu(), score + 1e-10 * q / (1.0 + q), score).numpy()
        return np.where(self.fixed.cpu().numpy(), np.inf, score)

    @torch.no_grad()
    def progress(self, params) -> float:
        """The FLOPs cut weighted by how far each channel has come from where it started
        towards the hard rule (0 at the first training step, 1 when pruned), measured in
        ``z = Phi^-1(p)`` (for a gate: its logit), which the regulariser moves at a steady
        rate (log p would move fastest far from death): a smooth leading indicator of the
        hard cut for the controller."""
        logp = self.log_deactivation(params).detach().double()
        z = torch.special.ndtri(torch.exp(logp).clamp(1e-300, 1.0 - 1e-16)).float()
        z = torch.where(self.scored, z, self.gate_logits.detach().float())
        if int(self.controller.steps) == 0:
            self.logp0.copy_(z)
        end = torch.where(self.scored, torch.tensor(float(torch.special.ndtri(torch.tensor(self.scp.c0)))),
                          torch.tensor(0.0))
        u = ((z - self.logp0) / (end - self.logp0).clamp(min=1e-6)).clamp(0.0, 1.0)
        return float(self.cost.ratio((1.0 - u).cpu().numpy()))

    def forward(self, *params) -> torch.Tensor:
        one = self.gate_logits.new_ones(1)
        if self.force_keep:
            return one.expand(self.size + 1)
        pi = self.prune_probs(params)
        self.last_pi = pi
        if self.training:
            hard = hard_keep(pi.detach())
            self.controller.advance(float(self.cost.ratio(hard.cpu().numpy())), self.progress(params))
            keep = soft_keep(pi, self.scp.tau)
            if self.scp.straight_through:  # gated channels: the hard rule forward, the soft mask's gradient
                keep = torch.where(self.gates(), hard.to(keep.dtype) + (keep - keep.detach()), keep)
        else:
            keep = hard_keep(pi).to(pi.dtype)
        return torch.cat([keep, one.to(keep.dtype)])
