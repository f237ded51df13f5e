"""The latency model: predicted ONNX Runtime latency of the model for any keep vector.

Each mixing op of the analysis (dense, grouped and depthwise conv, linear; the terms of
``CostModel``) is timed alone as a tiny ONNX graph (conv + bias + ReLU, which ORT fuses
as it fuses the exported conv-BN-ReLU of the whole graph; Gemm for linear) at a grid of
kept input and output counts: per group a few widths (fractions of it, multiples of the
runtime's block size and of any conv groups), so ops of the same shape share one table.
Timing as DESIGN.md section 6: ``allow_spinning = 0``, the deployment's intra-op thread
count, warm-up, medians of interleaved round-robin repeats. The whole network is the sum
of its ops plus a constant, calibrated by one whole-model run of the original (the tiny
graphs pay layout reorders the whole graph does not; the constant absorbs the rest: BN
folded, element-wise work, pooling). Ops the builder does not know (matmul, functional
conv) cost their FLOPs times the measured ms per FLOP.

Widths should be chosen from measured points (``points(gid)``: a group's efficient grid
widths, those faster than every wider one): between points the table interpolates
bilinearly, which misses the steps at the runtime's block sizes. Tables are cached on
disk (``latency_cache.py``); a second run measures nothing.

Example::

    lat = LatencyCost(cg, index, model, inputs, ort_threads=2)
    lat.flops(keep)        # predicted ms (the CostModel protocol: flops/ratio/marginal)
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from softprune_fx.passes.ops import node_arg

from .cost import CostModel
from .latency_cache import LatencyCache, Table, efficient

FRACS = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)


def block_size(width: int) -> int:
    """Channel block of the CPU kernels (MLAS NCHWc: 16 with AVX-512, else 8)."""
    from .latency_cache import cpu_model
    big = 16 if "avx512f" in cpu_model() else 8
    return big if width >= 4 * big else 8 if width >= 16 else 1


def grid_widths(width: int, multiple: int = 1, fracs=FRACS) -> list[int]:
    """Measured widths of a ``width``-wide group: fractions of it, on multiples of
    ``multiple`` and the block size, and the full width."""
    m = math.lcm(max(1, multiple), block_size(width))
    pts = {width} | {max(m, int(round(width * f / m)) * m) for f in fracs}
    return sorted(p for p in pts if 0 < p <= width)


# ---------------------------------------------------------------------- tiny graphs
def op_spec(node, modules) -> dict | None:
    """The shapes and attributes that fix an op's latency, JSON-able; None: not built."""
    x = node_arg(node, 0, "input").meta.get("val")
    if node.op != "call_module" or not isinstance(x, torch.Tensor):
        return None
    m = modules[node.target]
    if isinstance(m, nn.Linear):
        return {"op": "gemm", "x": list(x.shape), "in": m.in_features, "out": m.out_features}
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and isinstance(m.padding, tuple):
        return {"op": "conv", "x": list(x.shape), "in": m.in_channels, "out": m.out_channels,
                "k": list(m.kernel_size), "stride": list(m.stride), "pads": list(m.padding) * 2,
                "dil": list(m.dilation), "groups": m.groups, "dw": m.groups == m.in_channels and m.groups > 1}
    return None


def _tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def build(spec: dict, i: int, o: int) -> tuple[onnx.ModelProto, dict]:
    """A tiny ONNX graph of ``spec`` with ``i`` input and ``o`` output channels, and a feed."""
    rng = np.random.default_rng(0)
    if spec["op"] == "gemm":
        lead = spec["x"][:-1]
        w = numpy_helper.from_array(rng.standard_normal((o, i)).astype(np.float32), "W")
        b = numpy_helper.from_array(np.zeros(o, np.float32), "B")
        if len(lead) == 1:
            nodes = [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)]
        else:
            w = numpy_helper.from_array(rng.standard_normal((i, o)).astype(np.float32), "W")
            nodes = [helper.make_node("MatMul", ["X", "W"], ["Z"]), helper.make_node("Add", ["Z", "B"], ["Y"])]
        xshape = [*lead, i]
    else:
        groups = o * spec["in"] // spec["out"] if spec["dw"] else spec["groups"]
        if spec["dw"]:
            i = groups
        xshape = [spec["x"][0], i, *spec["x"][2:]]
        w = numpy_helper.from_array(rng.standard_normal((o, i // groups, *spec["k"])).astype(np.float32), "W")
        b = numpy_helper.from_array(np.zeros(o, np.float32), "B")
        nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Z"], strides=spec["stride"], pads=spec["pads"],
                                  dilations=spec["dil"], group=groups, kernel_shape=spec["k"]),
                 helper.make_node("Relu", ["Z"], ["Y"])]
    graph = helper.make_graph(nodes, "op", [_tensor("X", xshape)], [_tensor("Y", [])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"X": rng.standard_normal(xshape).astype(np.float32)}


# ---------------------------------------------------------------------- timing
class OrtTimer:
    """Times tiny graphs and whole ONNX files in ORT CPU with ``threads`` intra-op threads
    (None/0: ORT's default), spinning off, interleaved round-robin, medians."""

    def __init__(self, threads: int | None = None, warmup: int = 1, repeats: int = 5):
        self.threads, self.warmup, self.repeats = threads, warmup, repeats

    def session(self, model):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = int(self.threads or 0)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])

    def _interleaved(self, runs, warmup: int, repeats: int) -> list[np.ndarray]:
        for run in runs:
            for _ in range(warmup):
                run()
        times = np.zeros((repeats, len(runs)))
        for r in range(repeats):
            shift = r % len(runs)
            for k in list(range(shift, len(runs))) + list(range(shift)):
                start = time.perf_counter()
                runs[k]()
                times[r, k] = (time.perf_counter() - start) * 1e3
        return [times[:, k] for k in range(len(runs))]

    def ops(self, jobs: list[tuple[onnx.ModelProto, dict]]) -> list[float]:
        """Fastest ms of each (model, feed) over interleaved round-robin repeats."""
        runs = []
        for model, feed in jobs:
            s = self.session(model)
            runs.append(lambda s=s, feed=feed: s.run(None, feed))
        # the fastest repeat: on a shared CPU interference only adds time, and one preempted
        # run in five moves a median of five on sub-millisecond ops
        return [float(np.min(t)) for t in self._interleaved(runs, self.warmup, self.repeats)]

    def files(self, paths: dict, feed_of, warmup: int = 5, repeats: int = 30) -> dict:
        """{name: (median, p10, p90) ms} of whole ONNX files, interleaved; ``feed_of(session)``."""
        sessions = {n: self.session(p) for n, p in paths.items()}
        runs = [lambda s=s: s.run(None, feed_of(s)) for s in sessions.values()]
        out = self._interleaved(runs, warmup, repeats)
        return {n: tuple(float(np.percentile(t, q)) for q in (50, 10, 90)) for n, t in zip(sessions, out)}


def measure_models(models: dict, inputs, threads=None, warmup: int = 5, repeats: int = 30, timer=None) -> dict:
    """Export each ``{name: module}`` and time the files interleaved: {name: (median, p10, p90)}."""
    from .onnx_check import _feed, export_onnx
    timer = timer or OrtTimer(threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = str(Path(tmp) / f"{name}.onnx")
            export_onnx(m, inputs, paths[name])
        feeds = {}
        return timer.files(paths, lambda s: feeds.setdefault(id(s), _feed(s, inputs)), warmup, repeats)


# ---------------------------------------------------------------------- the cost model
@dataclass
class _Axis:
    ids: np.ndarray | None      # flat ids (-1 = kept), None: the count is fixed at ``pts[0]``
    sg: np.ndarray | None       # site-group ids of an input axis
    pts: list[int]


def _key(x) -> str:
    import json
    return json.dumps(x, sort_keys=True)


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
        self.measured0 = self._whole(model, inputs, specs) if calibrate else self.ops0
        self.constant = self.measured0 - self.ops0
        self.total0 = self.flops(full)

    # -- construction
    def _group_grid(self, specs, round_to) -> None:
        """Widths per prunable group: multiples of its grouped convs' groups (and of an int
        ``round_to``)."""
        mult = {g.id: int(round_to) if isinstance(round_to, int) and round_to > 1 else 1
                for g in self.index.groups}
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

    def _whole(self, model, inputs, specs) -> float:
        """p10 ms of the original model in ORT (the tables hold fastest repeats; cached by
        its ops and input shapes)."""
        shapes = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
        entry = {"whole": _key([specs, [(t.node, t.coef) for t in self.flops_model.terms], shapes]), "v": 1}
        value = self.cache.get(entry)
        if value is None:
            value = {"ms": measure_models({"orig": model}, inputs, self.threads, timer=self.timer)["orig"][1]}
            self.cache.put(entry, value)
        return float(value["ms"])

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

    def refit(self, observed: list[tuple[np.ndarray, float]]) -> None:
        """Calibrate ``ms = scale * ops + constant`` on whole-model measurements
        ``[(keep, ms)]`` (least squares; the original is one of them)."""
        s = np.array([self.ops_ms(k) for k, _ in observed])
        m = np.array([ms for _, ms in observed])
        fit = np.polyfit(s, m, 1) if len(s) >= 2 and np.ptp(s) > 1e-9 else None
        if fit is not None and 0.1 <= fit[0] <= 10.0:  # a wild slope is a disturbed measurement
            self.scale, self.constant = float(fit[0]), float(fit[1])
        elif len(s):
            self.scale, self.constant = 1.0, float(np.mean(m - s))
        self.total0 = self.flops(np.ones(self.index.size))


LOOP_TOL = 0.01


def _finish_reachable(finish, goal: float):
    """``finish(goal)``, lowering the goal by 5 points (at most 4 times) while the predicted
    latency cannot reach it: the first measurement then recalibrates the model."""
    from softprune_fx.passes.errors import BudgetError
    for _ in range(4):
        try:
            return finish(goal), goal
        except BudgetError:
            goal -= 0.05
    return finish(goal), goal


def close_loop(finish, cost: LatencyCost, model, inputs, ratio: float, rounds: int = 2, tol: float = LOOP_TOL):
    """Decide (``finish(goal) -> (pruned, result)``), measure original and pruned
    interleaved, and while the measured cut misses ``ratio`` by more than ``tol`` (at most
    ``rounds`` more times) refit the model's scale and constant on the measurements, move
    the goal by what the refit model still misses, and decide again; the measured-closest
    result wins. Fills the result's latency fields (achieved/target: latency fractions;
    the prediction reported is the one the kept result was decided on)."""
    goal, best, history, observed = ratio, None, [], [(np.ones(cost.index.size), cost.measured0)]
    for r in range(rounds + 1):
        (pruned, result), goal = _finish_reachable(finish, goal)
        keep = cost.index.keep_from_drop(result.drop)
        pred0, pred1 = cost.total0, cost.flops(keep)
        stats = measure_models({"orig": model, "pruned": pruned}, inputs, cost.threads, timer=cost.timer)
        m0, m1 = stats["orig"][0], stats["pruned"][0]
        cut = 1.0 - m1 / m0
        history.append({"goal": round(goal, 4), "predicted_cut": round(1 - pred1 / pred0, 4),
                        "measured_cut": round(cut, 4), "ms_before": round(m0, 4), "ms_after": round(m1, 4)})
        if best is None or abs(cut - ratio) < abs(best[2] - ratio):
            best = (pruned, result, cut, m0, m1, pred0, pred1)
        if abs(cut - ratio) <= tol or r == rounds:
            break
        observed.append((keep, cost.measured0 * m1 / m0))  # this run's fraction, on the calibrated scale
        cost.refit(observed)
        goal = float(np.clip(ratio + (cost.ratio(keep) - cut), 0.01, 0.95))
    pruned, result, cut, m0, m1, pred0, pred1 = best
    result.flops_ratio = result.achieved_ratio
    result.target, result.ort_threads = "latency", cost.threads
    result.target_ratio, result.achieved_ratio = ratio, cut
    result.ort_ms_before, result.ort_ms_after = m0, m1
    result.ort_pred_ms_before, result.ort_pred_ms_after = pred0, pred1
    result.ort_pred_error = pred1 / m1 - 1.0
    result.ort_pred_cut = 1.0 - pred1 / pred0
    result.ort_pred_error_rel = (pred1 / pred0) / (m1 / m0) - 1.0  # load drift since calibration cancels
    result.latency_rounds = history
    return pruned, result
