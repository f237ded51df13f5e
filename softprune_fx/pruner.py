"""The pruning API: ``SoftPruner`` (SCP joint training) and ``prune_one_shot`` (no data).

Example::

    pruner = SoftPruner(model, (x,), ratio=0.4)
    opt = torch.optim.SGD(pruner.param_groups(weight_decay=1e-4), lr=0.1, momentum=0.9)
    for x, y in loader:
        loss = F.cross_entropy(pruner.model(x), y) + pruner.regularization()
        opt.zero_grad(); loss.backward(); opt.step()
    pruned, result = pruner.finalize()
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from softprune_fx.passes.capture import as_input_tuple
from softprune_fx.passes.errors import SoftpruneError
from softprune_fx.passes.flops import FlopTotal, count_params
from softprune_fx.passes.masks import insert_soft_masks
from softprune_fx.onnx_check import max_abs_diff

from .api import analyze
from .bnsites import bn_log_probabilities, find_bn_sites
from .cost import CostModel
from .decide import decide, min_count
from .index import ChannelIndex
from .scp import SCPConfig, gate_regularizer, hard_keep, keep_score, prune_prob, scp_regularizer
from .softmask import MaskBank


@dataclass
class PruneResult:
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    target_ratio: float
    achieved_ratio: float
    drop: dict
    widths: dict
    kinds: dict
    max_abs_diff: float
    rounding_dropped: list = field(default_factory=list)
    inexact: list = field(default_factory=list)
    scores: str = "scp"
    thresholds: dict = field(default_factory=dict)  # SoftPruner: group -> dead thresholds used ([] = gate)
    training_cut: Optional[float] = None            # SoftPruner: the hard-rule cut when finalize began
    training_shortfall: Optional[float] = None      # target - training_cut, when over 5 points
    # target="latency" (softprune_fx/latency.py): target/achieved_ratio are then ORT latency fractions
    target: str = "flops"
    ort_threads: Optional[int] = None
    flops_ratio: Optional[float] = None             # the FLOPs cut, beside a latency cut
    ort_ms_before: Optional[float] = None           # measured (same ORT threads, interleaved)
    ort_ms_after: Optional[float] = None
    ort_pred_ms_before: Optional[float] = None      # the latency model's prediction
    ort_pred_ms_after: Optional[float] = None
    ort_pred_error: Optional[float] = None          # ort_pred_ms_after / ort_ms_after - 1
    ort_pred_cut: Optional[float] = None
    ort_pred_error_rel: Optional[float] = None      # of the kept fraction: (1 - pred cut) / (1 - measured) - 1
    latency_rounds: list = field(default_factory=list)  # the closed loop: predicted/measured cut per round
    analysis: Any = field(default=None, repr=False, compare=False)  # the ChannelGraph the run used

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "analysis"}
        d["widths"] = {k: list(v) for k, v in self.widths.items()}
        return d


def _prunable_or_raise(cg) -> None:
    if not any(g.prunable for g in cg.groups):
        reasons = sorted({g.frozen_reason for g in cg.groups if g.frozen_reason})[:3]
        raise SoftpruneError("the model has no prunable channel group (" + "; ".join(reasons) +
                             "); run `softprune-fx deps` to see why")


def _fixed_keep(cg, index: ChannelIndex, has_bn: np.ndarray, strict: bool) -> np.ndarray:
    """Channels never pruned: frozen ones, and with ``strict`` the gate-only ones."""
    fixed = index.frozen.copy()
    if strict:
        fixed |= ~has_bn
    return fixed


def _finish(cg, index, cost, scores, keep0, ratio, *, min_width, round_to, how, points=None):
    """Decide, legalize, prune and check ``pruned == masked`` on one analysis (no new trace).
    None when ``cost`` took its total from the registry's terms and the check's FLOPs count
    disagrees with them (the caller then counts the original and decides again)."""
    decision = decide(cg, index, cost, scores, keep0, ratio, min_width=min_width, round_to=round_to,
                      **({"points": points} if points is not None else {}))
    flops_model = getattr(cost, "flops_model", cost)  # a LatencyCost's total0 is ms
    drop = cg.legalize(decision.drop, {g.id: scores[index.ids(g.id)] for g in cg.groups})
    pruned = cg.prune(drop)
    inputs = cg.inputs
    with torch.no_grad():
        ref = cg.run_masked(drop)  # what masked(drop) computes, on the analysis's own graph
        with FlopTotal() as counter:  # the check's forward counts the FLOPs too
            out = pruned.eval()(*inputs)
    diff = max_abs_diff(ref, out)
    flops_after = int(counter.get_total_flops())
    if getattr(flops_model, "from_terms", False):
        if not flops_model.agrees(index.keep_from_drop(drop), flops_after):
            return None  # the registry's terms miss some of this graph's FLOPs: count them
        cg.__dict__.setdefault("flops", flops_model.total0)  # confirmed: ``cg.flops`` needs no forward
    flops0 = flops_model.total0
    widths, kinds = {}, {}
    for g in cg.groups:
        widths[g.id] = (g.width, g.width - len(drop.get(g.id, ())))
        kinds[g.id] = sorted(g.kinds)
    result = PruneResult(flops0, flops_after, count_params(cg.gm), count_params(pruned), ratio,
                         1.0 - flops_after / flops0, drop, widths, kinds, diff,
                         decision.rounding_dropped, list(cg.flow.inexact), how)
    result.analysis = cg
    return pruned, result


def prune_one_shot(model: nn.Module, example_inputs: Any, ratio: float = 0.4, *, strict: bool = False,
                   frozen=(), min_width=1, round_to="auto", allow_inexact: bool = False, leaf_modules=(),
                   scp: SCPConfig = SCPConfig(), analysis=None, target: str = "flops",
                   ort_threads: Optional[int] = None, latency_cache=None) -> tuple[fx.GraphModule, PruneResult]:
    """Prune a trained model without data: SCP deactivation probabilities of its BN
    statistics rank channels; groups without a BN-rectifier site fall back to the L1 norm
    of their consumer weights, cut by the BN-scored groups' average fraction.

    ``analysis`` (``analyze(model, example_inputs, ...)`` made before, in eval mode) is
    used instead of tracing again; ``result.analysis`` is the one the run used.

    ``target="latency"``: ``ratio`` is the fraction of ONNX Runtime latency (``ort_threads``
    intra-op threads, None: ORT's default) to remove, decided on the latency model
    (``softprune_fx/latency.py``, tables cached in ``latency_cache`` or the user cache dir)
    and checked by measuring the pruned model (re-decided at most three times, latency_loop.py)."""
    inputs = as_input_tuple(example_inputs)
    options = dict(frozen=frozen, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
    was_training = model.training
    model.eval()
    try:
        cg = analysis if analysis is not None else analyze(model, inputs, **options)
        _prunable_or_raise(cg)
        index = cg.index
        # FLOPs mode: the original's count from the registry's terms, confirmed on the
        # check's counted forward (one forward fewer); counted for real if they disagree
        counted = target == "latency" or "flops" in cg.__dict__
        cost = CostModel(cg, index, model, inputs, total=cg.flops if counted else "terms")
        lat = _latency_cost(cg, index, model, inputs, cost, target, ort_threads, latency_cache, round_to)
        sites = find_bn_sites(cg, index, delta=scp.delta)
        params = dict(model.named_parameters())
        with torch.no_grad():
            logp, has = bn_log_probabilities(sites, lambda t: params[t].detach().float(), index.size, scp.eps)
            pi = prune_prob(torch.exp(logp), scp.k, scp.c0).numpy()
        has = has.numpy()
        fixed = _fixed_keep(cg, index, has, strict)
        # 1 - p, ordered by log p where it rounds to 1 (live channels behind SiLU); 1 - pi saturates
        scores = np.where(has, keep_score(logp).numpy(), 0.0)
        keep0 = np.where(has, pi < 0.5, True)
        l1 = _consumer_l1(cg, index, model)
        free_bn = has & ~fixed
        frac = float((~keep0[free_bn]).mean()) if free_bn.any() else 0.0
        for g in cg.groups:
            ids = index.ids(g.id)
            gate = ids[~has[ids] & ~fixed[ids]]
            if len(gate):
                rank = np.argsort(np.argsort(l1[gate]))
                scores[gate] = (rank + 1) / (len(gate) + 1)
                keep0[gate] = rank >= int(round(frac * len(gate)))
        scores = np.where(fixed, np.inf, scores)
        keep0 = keep0 | fixed
        def finish(goal=ratio):
            return _finish(cg, index, lat if target == "latency" else cost, scores, keep0, goal,
                           min_width=min_width, round_to=round_to, how="bn-statistics",
                           points=_points(lat, target, round_to))
        if target == "latency":
            from .latency import close_loop
            return close_loop(finish, lat, model, inputs, ratio)
        out = finish()
        if out is None:
            cost = CostModel(cg, index, model, inputs, total=cg.flops)
            out = finish()
        return out
    finally:
        model.train(was_training)


def _points(lat, target, round_to):
    """The latency tables' efficient widths: the candidates in latency mode (unless
    ``round_to`` is none) and with ``round_to="auto"`` in FLOPs mode."""
    if lat is None or round_to in (None, "none") or (target == "flops" and round_to != "auto"):
        return None
    return lat.points


def _latency_cost(cg, index, model, inputs, cost, target, ort_threads, latency_cache, round_to):
    """The latency model when the target is latency, or when ORT threads or a table cache
    are named (then ``round_to="auto"`` takes widths from its efficient points); with
    neither, ``round_to="auto"`` takes the tables only if they are already cached for ORT's
    default threads (nothing is timed); else None."""
    if target not in ("flops", "latency"):
        raise SoftpruneError(f"target must be 'flops' or 'latency', got {target!r}")
    if target == "flops" and ort_threads is None and latency_cache is None:
        from .latency_cache import has_tables
        if round_to != "auto" or not has_tables():
            return None
        from .latency import cached_latency_cost
        return cached_latency_cost(cg, index, model, inputs, cost, round_to) if round_to == "auto" else None
    from .latency import LatencyCost
    return LatencyCost(cg, index, model, inputs, ort_threads=ort_threads, latency_cache=latency_cache,
                       round_to=round_to, cost=cost)


def _consumer_l1(cg, index: ChannelIndex, model: nn.Module) -> np.ndarray:
    """L1 norm of the consumer weight columns that read each channel."""
    from softprune_fx.passes.ops import lookup
    l1 = np.zeros(index.size + 1)
    modules = dict(cg.gm.named_modules())
    for site in cg.flow.sites:
        entry = lookup(site.node, modules) if site.kind in ("conv", "linear") else None
        cols = entry.importance(site.node, modules) if entry is not None and entry.importance else None
        if cols is None or len(cols) != len(site.atoms):  # the registry's one-shot importance
            continue
        cls, sg = index.site_ids(site)
        np.add.at(l1, cls, cols)
        np.add.at(l1, sg, cols)
    return l1[:-1]


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
        _prunable_or_raise(self.cg)
        self.index = self.cg.index
        self.cost = CostModel(self.cg, self.index, self.base, self.inputs, total=cg.flops)
        # target="latency": the controller steers the hard-rule keep set's predicted ORT latency
        self.target, self.lat = target, _latency_cost(self.cg, self.index, self.base, self.inputs, self.cost,
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
        fixed = _fixed_keep(self.cg, self.index, has, strict)
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
        fixed = self.bank.fixed.cpu().numpy()
        keep0 = keep0 | fixed
        cut = float(self.steer.ratio(keep0))
        was = self.base.training
        self.base.eval()
        points = _points(self.lat, self.target, self.round_to)
        try:
            def finish(goal=self.ratio):
                return _finish(self.cg, self.index, self.steer, scores, keep0, goal, min_width=self.min_width,
                               round_to=self.round_to, how="scp", points=points)
            if self.target == "latency":  # measured in ORT, re-decided up to three times (latency_loop.py)
                from .latency import close_loop
                pruned, result = close_loop(finish, self.lat, self.base, self.inputs, self.ratio)
            else:
                pruned, result = finish()
        finally:
            self.base.train(was)
        result.thresholds, result.training_cut = self.thresholds(), cut
        result.training_shortfall = _shortfall(self.ratio, cut)
        return pruned, result


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
