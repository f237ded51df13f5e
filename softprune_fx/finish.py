"""The common end of both pruners: the result record, and ``finish`` (decide, legalize,
prune and check ``pruned == masked`` on one analysis), with the latency model's hooks.

Example::

    pruned, result = finish(cg, cg.index, cost, scores, keep0, 0.4, min_width=1,
                            round_to="auto", how="bn-statistics")
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np

import torch

from softprune_fx.onnx_check import compare, flatten_outputs
from softprune_fx.passes.errors import SoftpruneError, SurgeryError
from softprune_fx.passes.flops import count_params, flop_counter

from .decide import decide
from .index import ChannelIndex


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
    silenced: int = 0                               # SoftPruner: kept channels whose gate had closed, made silent
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
    ort_pred_cut_tables: Optional[float] = None     # the tables' alone (ort_pred_cut: corrected by the other
    ort_pred_fixed_share: Optional[float] = None    # measured candidates' fixed share, latency_loop.fixed_share)
    latency_rounds: list = field(default_factory=list)  # the closed loop: predicted/measured cut per round
    analysis: Any = field(default=None, repr=False, compare=False)  # the ChannelGraph the run used

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "analysis"}
        d["widths"] = {k: list(v) for k, v in self.widths.items()}
        return d


def prunable_or_raise(cg) -> None:
    if not any(g.prunable for g in cg.groups):
        reasons = sorted({g.frozen_reason for g in cg.groups if g.frozen_reason})[:3]
        raise SoftpruneError("the model has no prunable channel group (" + "; ".join(reasons) +
                             "); run `softprune-fx deps` to see why")


def fixed_keep(cg, index: ChannelIndex, has_bn: np.ndarray, strict: bool) -> np.ndarray:
    """Channels never pruned: frozen ones, and with ``strict`` the gate-only ones."""
    fixed = index.frozen.copy()
    if strict:
        fixed |= ~has_bn
    return fixed


def finish(cg, index, cost, scores, keep0, ratio, *, min_width, round_to, how, points=None):
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
        with same_randomness(inputs):
            ref = cg.run_masked(drop)  # what masked(drop) computes, on the analysis's own graph
        with flop_counter(pruned) as counter, same_randomness(inputs):  # the check's forward counts the FLOPs too
            out = pruned.eval()(*inputs)
    diff = exact_or_raise(cg, ref, out, drop, pruned)
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


@contextlib.contextmanager
def same_randomness(inputs, seed: int = 0):
    """Both forwards of the check draw the same random numbers (ViTMAE shuffles its tokens by
    ``torch.rand`` in eval mode too); the caller's generator state is restored afterwards."""
    devices = sorted({t.device.index or 0 for t in torch.utils._pytree.tree_leaves(inputs)
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


MASKED_REL = 1e-4  # float32 summation order moves pruned vs masked by ~1e-6 of an output's scale


def exact_or_raise(cg, ref, out, drop=None, pruned=None) -> float:
    """max|pruned - masked| over the outputs; raises SurgeryError when one differs by more
    than ``MASKED_REL * max(1, max|ref|)`` (100 epsilons of a coarser dtype): the pruned
    model would be silently wrong. Not enforced when the analysis allowed inexact ops and
    met one (they change the outputs by design).

    A float32 miss is looked at again in float64 (``drop`` and ``pruned`` given): models
    whose activations grow large (randomly initialised EfficientNetV2) amplify the rounding
    of a different summation order past any fixed float32 tolerance, while a wrong channel
    stays wrong at any precision."""
    rel = _tolerance(ref)
    diff, ok = compare(ref, out, rel)
    if ok or (cg.flow.allow_inexact and cg.flow.inexact):
        return diff
    seen = f"{diff:.3g}"
    if drop is not None and pruned is not None and _float32(ref):
        diff64, ok = compare(*_in_float64(cg, drop, pruned), MASKED_REL)
        if ok:
            return diff
        seen += f" in float32, {diff64:.3g} in float64"
    raise SurgeryError(f"the pruned model differs from the hard-masked model (max|diff| {seen}, more than {rel:g} x "
                       "max(1, max|output|)): a bug in a channel or surgery rule, so nothing is returned; freeze the "
                       "layers involved (frozen=...) and report it with `softprune-fx deps` output")


def _floats(value) -> list:
    return [t for _, t in flatten_outputs(value) if t.is_floating_point()]


def _tolerance(ref) -> float:
    return max([MASKED_REL] + [100 * torch.finfo(t.dtype).eps for t in _floats(ref)])


def _float32(ref) -> bool:
    floats = _floats(ref)
    return bool(floats) and all(t.dtype == torch.float32 for t in floats)


def _in_float64(cg, drop, pruned):
    """The check's two forwards again on float64 copies (the analysis's graph, run with
    copied modules; the pruned model copied): the originals are left as they are."""
    from softprune_fx.passes.flops import eval_mode
    from softprune_fx.passes.masks import HardMaskedRun

    def double(t):
        return t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
    inputs = torch.utils._pytree.tree_map(double, cg.inputs)
    modules = copy.deepcopy(cg.gm).double()
    with eval_mode(modules):
        run = HardMaskedRun(cg.gm, cg.flow, cg.plan(drop))
        run.module, run.submodules = modules, dict(modules.named_modules())
        with same_randomness(inputs):
            ref = run.run(*inputs)
        with same_randomness(inputs):
            out = copy.deepcopy(pruned).double().eval()(*inputs)
    return ref, out


def latency_points(lat, target, round_to):
    """The latency tables' efficient widths: the candidates in latency mode (unless
    ``round_to`` is none) and with ``round_to="auto"`` in FLOPs mode."""
    if lat is None or round_to in (None, "none") or (target == "flops" and round_to != "auto"):
        return None
    return lat.points


def latency_cost(cg, index, model, inputs, cost, target, ort_threads, latency_cache, round_to):
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
