"""``prune_one_shot``: prune a trained model without data, channels ranked by SCP's
deactivation probabilities of its BN statistics.

Example::

    pruned, result = prune_one_shot(model, (torch.randn(1, 3, 224, 224),), ratio=0.4)
    result.achieved_ratio, result.max_abs_diff
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from softprune_fx.passes.capture import as_input_tuple
from softprune_fx.passes.gcpause import without_gc

from .api import analyze
from .bnsites import bn_log_probabilities, find_bn_sites
from .cost import CostModel
from .finish import PruneResult, finish as _finish, fixed_keep as _fixed_keep, latency_cost as _latency_cost
from .finish import latency_points as _points, prunable_or_raise as _prunable_or_raise
from .index import ChannelIndex
from .scp import SCPConfig, keep_score, prune_prob

__all__ = ["prune_one_shot", "PruneResult"]


@without_gc
def prune_one_shot(model: nn.Module, example_inputs: Any, ratio: float = 0.4, *, strict: bool = False,
                   frozen=(), min_width=1, round_to="auto", allow_inexact: bool = False, leaf_modules=(),
                   scp: SCPConfig = SCPConfig(), analysis=None, target: str = "flops",
                   ort_threads: Optional[int] = None, latency_cache=None,
                   check_capture: bool = False) -> tuple[fx.GraphModule, PruneResult]:
    """Prune a trained model without data: SCP deactivation probabilities of its BN
    statistics rank channels; groups without a BN-rectifier site fall back to the L1 norm
    of their consumer weights, cut by the BN-scored groups' average fraction.

    ``analysis`` (``analyze(model, example_inputs, ...)`` made before, in eval mode) is
    used instead of tracing again; ``result.analysis`` is the one the run used.

    ``target="latency"``: ``ratio`` is the fraction of ONNX Runtime latency (``ort_threads``
    intra-op threads, None: ORT's default) to remove, decided on the latency model
    (``softprune_fx/latency.py``, tables cached in ``latency_cache`` or the user cache dir)
    and checked by measuring the pruned model (re-decided at most three times, latency_loop.py).

    ``check_capture``: first compare the captured graph with ``model`` on the example inputs
    (``ChannelGraph.check_capture``, two more forwards; the CLI always does)."""
    inputs = as_input_tuple(example_inputs)
    options = dict(frozen=frozen, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
    was_training = model.training
    model.eval()
    try:
        cg = analysis if analysis is not None else analyze(model, inputs, **options)
        if check_capture:
            cg.check_capture(model)
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
        l1 = None  # consumer L1 norms, of the channels without a BN site only
        free_bn = has & ~fixed
        frac = float((~keep0[free_bn]).mean()) if free_bn.any() else 0.0
        for g in cg.groups:
            ids = index.ids(g.id)
            gate = ids[~has[ids] & ~fixed[ids]]
            if len(gate):
                l1 = consumer_l1(cg, index, model, ~has & ~fixed) if l1 is None else l1
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


def consumer_l1(cg, index: ChannelIndex, model: nn.Module, wanted: np.ndarray | None = None) -> np.ndarray:
    """L1 norm of the consumer weight columns that read each channel (of the ``wanted``
    channels at least: sites that read none of them are skipped)."""
    from softprune_fx.passes.ops import lookup
    l1 = np.zeros(index.size + 1)
    modules = dict(cg.gm.named_modules())
    for site in cg.flow.sites:
        entry = lookup(site.node, modules) if site.kind in ("conv", "linear") else None
        if entry is None or not entry.importance:
            continue
        cls, sg = index.site_ids(site)
        if wanted is not None and not (wanted[cls[cls >= 0]].any() or wanted[sg[sg >= 0]].any()):
            continue
        cols = entry.importance(site.node, modules)  # the registry's one-shot importance
        if cols is None or len(cols) != len(site.atoms):
            continue
        np.add.at(l1, cls, cols)
        np.add.at(l1, sg, cols)
    return l1[:-1]
