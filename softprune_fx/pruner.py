"""``SoftPruner``: SCP soft masks trained jointly with the weights (``oneshot.py`` has
``prune_one_shot``, the data-free path; ``finish.py`` the decision and surgery both end with).

Example::

    pruner = SoftPruner(model, (x,), ratio=0.4)
    opt = torch.optim.SGD(pruner.param_groups(weight_decay=1e-4), lr=0.1, momentum=0.9)
    for x, y in loader:
        loss = F.cross_entropy(pruner.model(x), y) + pruner.regularization()
        opt.zero_grad(); loss.backward(); opt.step()
    pruned, result = pruner.finalize()
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from softprune_fx.passes.capture import as_input_tuple
from softprune_fx.passes.errors import SoftpruneError
from softprune_fx.passes.masks import insert_soft_masks
from softprune_fx.passes.outputs import copy_output_type

from .api import analyze
from .bnsites import find_bn_sites, silenced
from .cost import CostModel
from .decide import min_count, rounding_step
from .finish import PruneResult, finish, fixed_keep, latency_cost, latency_points, prunable_or_raise
from .oneshot import consumer_l1, prune_one_shot  # noqa: F401 (prune_one_shot: the API's other entry point)
from .scp import SCPConfig, gate_regularizer, hard_keep, scp_regularizer
from .softmask import MaskBank

def _pull_weights(marginal: np.ndarray, free: np.ndarray, power: float) -> np.ndarray:
    """Per-channel weight of the regulariser: ``marginal FLOPs ** power``, mean 1 over the
    free channels. Why not the plain FLOPs share (power 1): it pulls hardest on the few
    most expensive channels (ConvNeXt's stream, EfficientNet's stem), which then carry the
    whole cut (digits ConvNeXt: stream 32 -> 8, MLPs untouched, -6 points) or collapse."""
    w = np.power(np.maximum(marginal, 0.0), power)
    return w / max(w[free].mean(), 1e-12) if free.any() else w


class SoftPruner:
    """SCP soft masks on a copy of ``model``, trained jointly to a FLOPs target (``target="latency"``:
    to a cut of the predicted ONNX Runtime latency with ``ort_threads``, measured at finalize).

    ``pruner.model`` is the masked model to train; the controller advances on each of its
    training-mode forwards. ``finalize()`` decides, removes the channels and verifies.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ratio: float = 0.4, *, strict: bool = False,
                 frozen=(), min_width=1, round_to="auto", allow_inexact: bool = False, leaf_modules=(),
                 scp: SCPConfig = SCPConfig(), kp: float = 0.15, ki: float = 5e-3, lambda_max: float = 0.2,
                 total_steps: Optional[int] = None, ramp: int = 100, weighting: float = 0.5, analysis=None,
                 target: str = "flops", ort_threads: Optional[int] = None, latency_cache=None):
        if not 0.0 < ratio < 1.0:
            raise SoftpruneError(f"ratio must be in (0, 1), got {ratio}")
        self.inputs = as_input_tuple(example_inputs)
        self.ratio, self.strict, self.min_width, self.round_to = ratio, strict, min_width, round_to
        self.options = dict(frozen=frozen, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
        # one trace: the analysis of the user's model, forked with its own copy of the
        # weights (``base``), which the masked model trains and finalize prunes
        cg = analysis if analysis is not None else analyze(model, self.inputs, **self.options)
        self.cg = cg.fork(copy_modules=True)
        self.base = self.cg.gm
        prunable_or_raise(self.cg)
        self.index = self.cg.index
        self.cost = CostModel(self.cg, self.index, self.base, self.inputs, total=cg.flops)
        # target="latency": the controller steers the hard-rule keep set's predicted ORT latency
        self.target, self.lat = target, latency_cost(self.cg, self.index, self.base, self.inputs, self.cost,
                                                      target, ort_threads, latency_cache, round_to)
        self.steer = self.lat if target == "latency" else self.cost
        sites = find_bn_sites(self.cg, self.index, scp.delta)
        # a smooth activation's threshold moves with delta, an exact zero region's edge does not
        exact = np.array([a.threshold == b.threshold
                          for a, b in zip(sites, find_bn_sites(self.cg, self.index, 0.5 * scp.delta))], bool)
        if strict:  # no learned gates: smooth sites keep the pull on beta
            scp = dataclasses.replace(scp, smooth_lever="bn")
        has = np.zeros(self.index.size, dtype=bool)
        for s in sites:
            has[s.flat] = True
        fixed = fixed_keep(self.cg, self.index, has, strict)
        floors = [(self.index.ids(g.id), min_count(g.width, min_width)) for g in self.cg.groups if g.prunable]
        self.bank = MaskBank(self.index.size, sites, fixed, self.steer, ratio, scp, kp, ki, lambda_max, ramp,
                             total_steps, exact, floors)
        self.weights = torch.as_tensor(_pull_weights(self.cost.marginal(np.ones(self.index.size)), ~fixed,
                                                     weighting)).float()
        self.model = self._masked_model(sites)
        self._history: list[dict] = []

    def _masked_model(self, sites) -> fx.GraphModule:
        graph = fx.Graph()
        val_map: dict = {}
        out = graph.graph_copy(self.cg.gm.graph, val_map)
        graph.output(out)
        copy_output_type(graph, self.cg.gm.graph)
        gm = fx.GraphModule(self.cg.gm, graph, "SoftPrunedModel")
        site_ids = []
        for site in self.cg.flow.sites:
            cls, sg = self.index.site_ids(site)
            if (cls >= 0).any() or (sg >= 0).any():
                site_ids.append((val_map[site.node], site.arg, site.axis, site.fill, cls, sg))
        args = [t for s in sites for t in (s.gamma, s.beta)]
        insert_soft_masks(gm, site_ids, self.bank, args)
        gm.train(self.base.training)
        return gm

    # ------------------------------------------------------------------ training API
    def _site_params(self) -> list[torch.Tensor]:
        return [self.model.get_parameter(t) for s in self.bank.sites for t in (s.gamma, s.beta)]

    def regularization(self) -> torch.Tensor:
        """lambda * (scp_regularizer over BN sites + gate_regularizer over the gates), each
        channel weighted by its FLOPs share (scp.py)."""
        gamma, beta = self.bank.gather(self._site_params())
        w = self.weights.to(beta.device)
        lever = self.bank.ent_lever.to(beta.device)  # smooth sites with gates: no pull on beta
        reg = scp_regularizer(gamma, beta, self.bank.ent_s.to(beta.device), weight=w[self.bank.ent_flat] * lever)
        gates = self.bank.gates()
        if gates.any():
            reg = reg + gate_regularizer(self.bank.gate_logits[gates], w.to(gates.device)[gates]).to(reg.device)
        return self.bank.lam.to(reg.device, reg.dtype) * reg

    def param_groups(self, weight_decay: float = 1e-4) -> list[dict]:
        """Optimizer groups: no weight decay on the site BNs' betas and the gates."""
        no_decay = {id(self.model.get_parameter(s.beta)) for s in self.bank.sites} | {id(self.bank.gate_logits)}
        params = list(self.model.parameters())
        return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]

    def hard_keep(self) -> np.ndarray:
        with torch.no_grad():
            pi = self.bank.prune_probs(self._site_params())
        return (pi < 0.5).cpu().numpy()

    def progress(self) -> dict:
        keep = self.hard_keep()
        alive = {g.id: int(keep[self.index.ids(g.id)].sum()) for g in self.cg.groups if g.prunable}
        latency = {"hard_latency_ratio": float(self.lat.ratio(keep))} if self.target == "latency" else {}
        return {"step": int(self.bank.steps), "hard_flops_ratio": float(self.cost.ratio(keep)), **latency,
                "target": self.ratio, "lambda": float(self.bank.lam), "alive": alive}

    def _silenceable(self) -> np.ndarray:
        """Per flat channel: whether ``bnsites.silenced`` can silence it (a BN site whose
        activation gives 0 at 0)."""
        silent = np.zeros(self.index.size, bool)
        for s in self.bank.sites:
            silent[s.flat] |= s.silent
        return silent

    def _closed_loud(self, keep0: np.ndarray) -> np.ndarray:
        """Gated channels the hard rule drops that ``bnsites.silenced`` cannot silence."""
        return self.bank.gates().cpu().numpy() & ~keep0 & ~self._silenceable()

    def thresholds(self) -> dict:
        """Per prunable group, the sorted dead thresholds ``t`` of the BN-activation sites that
        score its channels; ``[]`` for a gated group (no such site)."""
        per_flat: dict = {}
        for s in self.bank.sites:
            for f in s.flat.tolist():
                per_flat.setdefault(f, set()).add(float(s.threshold))
        return {g.id: sorted(set().union(*(per_flat.get(f, set()) for f in self.index.ids(g.id).tolist())))
                for g in self.cg.groups if g.prunable}

    def state_dict(self) -> dict:
        """The masked model's state, which holds the controller's (lambda, integral, steps, ramp,
        hard cut: buffers of ``bank.controller``), and the ratio."""
        return {"model": self.model.state_dict(), "ratio": self.ratio}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    # ------------------------------------------------------------------ finalize
    def finalize(self) -> tuple[fx.GraphModule, PruneResult]:
        """Decide the kept channels to the budget, remove them, verify; returns (pruned, result)."""
        if dist.is_available() and dist.is_initialized():
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        with torch.no_grad():
            params = self._site_params()
            keep0 = hard_keep(self.bank.prune_probs(params)).cpu().numpy()
            scores = self.bank.scores(params)  # keep_score: 1 - p, ordered by log p (1 - pi saturates)
        gates = self.bank.gates().cpu().numpy()
        if self.bank.scp.order_live_gates:
            scores = _order_live_gates(self.cg, self.index, self.base, scores, gates & keep0)
        fixed = self.bank.fixed.cpu().numpy()
        keep0 = keep0 | fixed
        cut = float(self.steer.ratio(keep0))
        # channels whose gate training closed: silent if the decision's rounding keeps them (bnsites.silenced)
        closed = gates & ~keep0 & self.bank.scp.silence_revived
        if self.target == "flops" and self.bank.scp.silence_revived:
            keep0 = _round_unsilenced(self.cg, self.index, keep0, scores, self._closed_loud(keep0), self.round_to,
                                      self.min_width)
        was = self.base.training
        self.base.eval()
        points = latency_points(self.lat, self.target, self.round_to)
        try:
            def decide_at(goal=self.ratio):
                return finish(self.cg, self.index, self.steer, scores, keep0, goal, min_width=self.min_width,
                               round_to=self.round_to, how="scp", points=points)
            with silenced(self.bank.sites, self.base.get_parameter, closed):
                if self.target == "latency":  # measured in ORT, re-decided up to three times (latency_loop.py)
                    from .latency import close_loop
                    pruned, result = close_loop(decide_at, self.lat, self.base, self.inputs, self.ratio)
                else:
                    pruned, result = decide_at()
        finally:
            self.base.train(was)
        result.silenced = int((self.index.keep_from_drop(result.drop) & closed & self._silenceable()).sum())
        result.thresholds, result.training_cut = self.thresholds(), cut
        result.training_shortfall = _shortfall(self.ratio, cut)
        return pruned, result


def _round_unsilenced(cg, index, keep0: np.ndarray, scores: np.ndarray, loud: np.ndarray, round_to,
                      min_width) -> np.ndarray:
    """``keep0`` with each group that has ``loud`` channels (closed gates that ``silenced`` cannot
    silence: no BN site, e.g. LayerNorm nets) cut to its rounding step below where that is nearer
    than the step above (its lowest-scored kept channels go). Why: the decision rounds up, which
    keeps such channels with their stale output; digits' ConvNeXt stem at 9 of 32 became 16, and
    160 live MLP channels were cut to pay for it (pruned 81% against masked 93%)."""
    out = keep0.copy()
    for g in cg.groups:
        ids = index.ids(g.id)
        if not g.prunable or not loud[ids].any():
            continue
        h, step = int(keep0[ids].sum()), rounding_step(g.width, round_to)
        down = max(h // step * step, min_count(g.width, min_width))
        if h % step and h - down < step - h % step:
            kept = ids[keep0[ids]]
            out[kept[np.argsort(scores[kept], kind="stable")[:h - down]]] = False
    return out


def _order_live_gates(cg, index, model, scores: np.ndarray, live: np.ndarray) -> np.ndarray:
    """The scores of each group's ``live`` gated channels (kept by their gate), permuted so that they
    rank as their consumers' weight L1 does: the decision sees the same values per group (so picks
    the same counts), and cuts the live ones its rounding must cut by the weight their consumers
    give them. Why: a live gate's own score (its pi, saturated at the annealed temperature) ordered
    them by noise; on digits' SiLU ResNet it cut the 8 channels of ``layer2.1.conv1`` whose
    consumer weights were largest (94.2% against 99.2% cutting the smallest; BENCHMARKS.md 10)."""
    if not live.any():
        return scores
    l1 = consumer_l1(cg, index, model, live)  # the registry's one-shot importance, summed per channel
    out = scores.copy()
    for g in cg.groups:
        ids = index.ids(g.id)
        ids = ids[live[ids]]
        if len(ids):
            out[ids[np.argsort(l1[ids], kind="stable")]] = np.sort(scores[ids])
    return out


SHORTFALL_POINTS = 0.05


def _shortfall(target: float, cut: float) -> Optional[float]:
    """``target - cut`` when training left the hard-rule cut more than 5 points short (and warn:
    the decision, not training, then makes the rest of the cut), else None."""
    short = target - cut
    if short <= SHORTFALL_POINTS:
        return None
    warnings.warn(f"training reached a hard-rule FLOPs cut of {cut:.1%} against the target {target:.0%}: "
                  f"the remaining {short:.1%} is cut by the decision, not by training (expect lower "
                  f"accuracy; train longer, or pass total_steps)", stacklevel=3)
    return short
