"""The latency model: predicted ONNX Runtime latency of the model for any keep vector.

Each mixing op of the analysis (dense, grouped and depthwise conv, linear; the terms of
``CostModel``) is timed alone as a tiny ONNX graph (conv + bias + ReLU, which ORT fuses
as it fuses the exported conv-BN-ReLU of the whole graph; Gemm for linear) at a grid of
kept input and output counts: per group a few widths (fractions of it, multiples of the
runtime's block size and of any conv groups), so ops of the same shape share one table.
Timing as DESIGN.md section 6: ``allow_spinning = 0``, the deployment's intra-op thread
count, warm-up, medians of interleaved round-robin repeats. The whole network is the sum
of its ops, scaled (when the whole model is faster than the sum: the tiny graphs pay layout
reorders the whole graph does not) or plus a constant (when slower), calibrated by one
whole-model run of the original on every run (only the op tables are cached: the
calibration follows the machine's state; the constant absorbs the rest: BN
folded, element-wise work, pooling). Ops the builder does not know (matmul, functional
conv) cost their FLOPs times the measured ms per FLOP.

Widths should be chosen from measured points (``points(gid)``: a group's efficient grid
widths, those faster than every wider one): between points the table interpolates
bilinearly, which misses the steps at the runtime's block sizes. Tables are cached on
disk (``latency_cache.py``); a second run times no op.

Files: this one (``LatencyCost``, the prediction), ``latency_timing.py`` (grid widths, tiny
graphs, ``OrtTimer``, ``measure_models``), ``latency_loop.py`` (``close_loop``: measure and
re-decide), ``latency_cache.py`` (tables and their cache). Their public names are
importable from here.

Example::

    lat = LatencyCost(cg, index, model, inputs, ort_threads=2)
    lat.flops(keep)        # predicted ms (the CostModel protocol: flops/ratio/marginal)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from .cost import CostModel
from .latency_cache import LatencyCache, Table, efficient, has_tables
from .latency_loop import LOOP_TOL, close_loop, next_goal  # noqa: F401 (the public names stay here)
from .latency_timing import (FRACS, OrtTimer, block_size, build, grid_widths, measure_cuts,  # noqa: F401
                             measure_models, measure_samples, op_spec, paired_cut)


# ---------------------------------------------------------------------- the cost model
@dataclass
class _Axis:
    ids: np.ndarray | None      # flat ids (-1 = kept), None: the count is fixed at ``pts[0]``
    sg: np.ndarray | None       # site-group ids of an input axis
    pts: list[int]


class LatencyCost:
    """Predicted ORT latency (ms) with the CostModel protocol: ``total0`` (ms of the
    original), ``flops(keep)`` (ms), ``ratio(keep)``, ``marginal(keep)`` (ms per channel).
    ``flops_model`` is the FLOPs CostModel beside it; ``points(gid)`` a group's efficient widths."""

    def __init__(self, cg, index, model: nn.Module, inputs, *, ort_threads: int | None = None,
                 latency_cache=None, round_to=None, cost: CostModel | None = None, timer=None,
                 calibrate: bool = True):
        self.index, self.threads = index, ort_threads
        self.flops_model = cost or CostModel(cg, index, model, inputs, total=cg.flops)
        self.cache = LatencyCache(ort_threads, latency_cache)
        self.timer = timer or OrtTimer(ort_threads)
        self.measured_ops = 0       # tiny graphs timed by this instance (0 on a warm cache)
        modules = dict(cg.gm.named_modules())
        nodes = {n.name: n for n in cg.gm.graph.nodes}
        specs = [op_spec(nodes[t.node], modules) for t in self.flops_model.terms]
        self._group_grid(specs, round_to)
        self.tables, self.axes, self.fallback = [], [], []
        for t, spec in zip(self.flops_model.terms, specs):
            self._add(t, spec)
        self._fallback_scale()
        self.scale, self.constant = 1.0, 0.0
        full = np.ones(index.size)
        self.ops0 = self.ops_ms(full)
        self.measured0 = self._whole(model, inputs) if calibrate else self.ops0
        self._calibrate()
        self.total0 = self.flops(full)

    def _calibrate(self) -> None:
        """Whole model = ``scale * ops + constant``. Slower than its ops' sum: the constant
        holds what the tables leave out (element-wise work, pooling). Faster: the tiny
        graphs' own layout reorders and run overheads, which grow with the ops' widths, so
        scale them (MobileNetV2, 2 ORT threads: ops 17.7 ms, whole model 8.5 ms; the negative
        constant predicted cuts of 0.93 for a measured 0.59). A scale also keeps the
        predicted *fraction* independent of the load the calibration ran under."""
        if self.measured0 < self.ops0:
            self.scale, self.constant = self.measured0 / self.ops0, 0.0
        else:
            self.scale, self.constant = 1.0, self.measured0 - self.ops0

    # -- construction
    def _group_grid(self, specs, round_to) -> None:
        """Widths per prunable group: multiples of its grouped convs' groups (and of an int
        ``round_to``)."""
        mult = {g.id: int(round_to) if isinstance(round_to, int) and round_to > 1 else 1
                for g in self.index.groups}
        self.grid = {g.id: None for g in self.index.groups if g.prunable}  # _group_of reads its keys
        for t, spec in zip(self.flops_model.terms, specs):
            if spec and spec["op"] == "conv" and spec["groups"] > 1 and not spec["dw"]:
                for ids in (t.in_cls, t.out):
                    gid = self._group_of(ids)
                    if gid is not None:
                        mult[gid] = math.lcm(mult[gid], spec["groups"])
        self.grid = {g.id: grid_widths(g.width, mult[g.id]) for g in self.index.groups if g.prunable}

    def _group_of(self, ids) -> str | None:
        """The one group whose every channel ``ids`` holds (others: -1), else None."""
        if ids is None:
            return None
        own = ids[ids >= 0]
        if not len(own):
            return None
        gs = np.unique(self.index.group_index[own])
        if len(gs) != 1:
            return None
        g = self.index.groups[int(gs[0])]
        return g.id if g.id in self.grid and len(np.unique(own)) == g.width else None

    def _axis(self, ids, sg, full: int) -> _Axis:
        if ids is None:
            return _Axis(None, None, [full])
        fixed = int((ids < 0).sum()) if sg is None else int(((ids < 0) & (sg < 0)).sum())
        if fixed == len(ids):
            return _Axis(ids, sg, [len(ids)])
        gid = self._group_of(ids) if sg is None or (sg < 0).all() else None
        per = len(ids) / max(1, len(np.unique(ids[ids >= 0]))) if gid else 1
        pts = [int(fixed + per * w) for w in self.grid[gid]] if gid else \
            [p for p in grid_widths(len(ids)) if p >= fixed] or [len(ids)]
        return _Axis(ids, sg, sorted(set(pts)))

    def _add(self, t, spec) -> None:
        """One term's table: from the cache, else timed (all its points interleaved)."""
        if spec is None:
            full_i = len(t.in_cls) if t.in_cls is not None else 1
            full_o = len(t.out) if t.out is not None else 1
            ax = (self._axis(t.in_cls, t.in_sg, full_i), self._axis(t.out, None, full_o))
            self.axes.append(ax)
            self.tables.append(None)
            self.fallback.append(t.coef)
            return
        ax = (self._axis(t.in_cls, t.in_sg, spec["in"]), self._axis(t.out, None, spec["out"]))
        entry = {"spec": spec, "i": ax[0].pts, "o": ax[1].pts, "v": 1}
        value = self.cache.get(entry)
        if value is None:
            jobs = [build(spec, i, o) for i in ax[0].pts for o in ax[1].pts]
            value = {"ms": self.timer.ops(jobs)}
            self.measured_ops += len(jobs)
            self.cache.put(entry, value)
        self.axes.append(ax)
        self.tables.append(Table.of(ax[0].pts, ax[1].pts, value["ms"]))
        self.fallback.append(None)

    def _fallback_scale(self) -> None:
        """ms per FLOP of the measured ops, for the ops without a tiny graph."""
        flops = ms = 0.0
        for t, tab in zip(self.flops_model.terms, self.tables):
            if tab is not None:
                i, o = self.flops_model._counts(t, np.ones(self.index.size + 1))
                flops += t.coef * i * o
                ms += tab.ms[-1, -1]
        self.ms_per_flop = ms / flops if flops else 0.0

    def _whole(self, model, inputs) -> float:
        """p10 ms of the original model in ORT, measured on every run, never cached: of
        everything the prediction holds, this is the most sensitive to the machine's state
        (load, frequency), and one whole-model run is cheap beside the op tables."""
        return float(measure_models({"orig": model}, inputs, self.threads, timer=self.timer)["orig"][1])

    # -- evaluation
    def _count(self, ax: _Axis, k: np.ndarray) -> float:
        if ax.ids is None:
            return float(ax.pts[0])
        return float((k[ax.ids] * k[ax.sg]).sum()) if ax.sg is not None else float(k[ax.ids].sum())

    def _terms(self, keep):
        k = np.append(np.asarray(keep, dtype=float), 1.0)
        for t, ax, tab, coef in zip(self.flops_model.terms, self.axes, self.tables, self.fallback):
            i, o = self._count(ax[0], k), self._count(ax[1], k)
            if tab is None:
                val, gi, go = (coef * self.ms_per_flop * v for v in (i * o, o, i))
            else:
                val, gi, go = tab.value_grad(i, o)
            yield k, ax, val, gi, go

    def ops_ms(self, keep) -> float:
        """The sum of the ops' table entries (uncalibrated)."""
        return float(sum(val for _, _, val, _, _ in self._terms(keep)))

    def flops(self, keep) -> float:
        """Predicted ms of the model keeping ``keep`` (name kept for the CostModel protocol)."""
        return self.scale * self.ops_ms(keep) + self.constant

    def ratio(self, keep) -> float:
        """Predicted fraction of the latency removed."""
        return 1.0 - self.flops(keep) / self.total0

    def marginal(self, keep) -> np.ndarray:
        """d(ms)/d(keep) per flat channel."""
        grad = np.zeros(self.index.size + 1)
        for k, ax, _, gi, go in self._terms(keep):
            a, b = ax
            if a.ids is not None:
                np.add.at(grad, a.ids, gi * (k[a.sg] if a.sg is not None else 1.0))
                if a.sg is not None:
                    np.add.at(grad, a.sg, gi * k[a.ids])
            if b.ids is not None:
                np.add.at(grad, b.ids, go)
        return self.scale * grad[:-1]

    def points(self, gid: str) -> list[int] | None:
        """The group's efficient widths: grid widths faster (others full) than every wider one."""
        if gid not in self.grid:
            return None
        ids = self.index.ids(gid)
        ms = []
        for w in self.grid[gid]:
            keep = np.ones(self.index.size)
            keep[ids[w:]] = 0.0
            ms.append(self.ops_ms(keep))
        return efficient(self.grid[gid], ms)


# ---------------------------------------------------------------------- cached tables only
class _Uncached(Exception):
    """An op's table is not in the cache."""


class _CacheOnly:
    """The timer of ``cached_latency_cost``: a table missing from the cache aborts (nothing is timed)."""

    threads = None

    def ops(self, jobs):
        raise _Uncached

    def files(self, paths, feed_of, warmup=5, repeats=30):
        raise _Uncached


def cached_latency_cost(cg, index, model, inputs, cost=None, round_to="auto", latency_cache=None,
                        ort_threads=None) -> LatencyCost | None:
    """The latency model from cached tables alone (uncalibrated: enough for ``points``), or
    None when any op's table for this runtime (ORT version, ``ort_threads``, CPU) is missing:
    ``round_to="auto"`` in FLOPs mode takes widths from the tables' efficient points only
    when an earlier latency run left them, and a default prune never times ORT."""
    if not has_tables(latency_cache):
        return None
    try:
        return LatencyCost(cg, index, model, inputs, ort_threads=ort_threads, latency_cache=latency_cache,
                           round_to=round_to, cost=cost, timer=_CacheOnly(), calibrate=False)
    except _Uncached:
        return None
