"""Timing for the latency model: the grid of widths, the tiny ONNX graph of one op, and
the ORT timer (DESIGN.md section 6: ``allow_spinning = 0``, the deployment's intra-op
thread count, warm-up, interleaved round-robin repeats).

Each mixing op (dense, grouped and depthwise conv, linear) is built alone as a tiny ONNX
graph (conv + bias + ReLU, which ORT fuses as it fuses the exported conv-BN-ReLU of the
whole graph; Gemm for linear) at a grid of kept input and output counts: per group a few
widths (fractions of it, multiples of the runtime's block size and of any conv groups).

Example::

    timer = OrtTimer(threads=2)
    timer.ops([build(spec, 64, 32)])              # [fastest ms]
    measure_models({"orig": m, "pruned": p}, (x,), threads=2)   # {name: (median, p10, p90)}
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from softprune_fx.passes.ops import node_arg

# 1/8: the narrowest point bounds the largest cut a decision on the tables can reach (with
# 1/4, MobileNetV2 with 2 threads stopped at a predicted 0.51 for a 0.6 target)
FRACS = (0.125, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)


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

    def samples(self, paths: dict, feed_of, warmup: int = 5, repeats: int = 30) -> dict:
        """{name: ms per repeat} of whole ONNX files, interleaved (repeat r of every file
        ran back to back); ``feed_of(session)``."""
        sessions = {n: self.session(p) for n, p in paths.items()}
        runs = [lambda s=s: s.run(None, feed_of(s)) for s in sessions.values()]
        return dict(zip(sessions, self._interleaved(runs, warmup, repeats)))

    def files(self, paths: dict, feed_of, warmup: int = 5, repeats: int = 30) -> dict:
        """{name: (median, p10, p90) ms} of whole ONNX files, interleaved; ``feed_of(session)``."""
        return {n: _stats(t) for n, t in self.samples(paths, feed_of, warmup, repeats).items()}


def _stats(t) -> tuple[float, float, float]:
    return tuple(float(np.percentile(t, q)) for q in (50, 10, 90))


def _timed(models: dict, inputs, timer, warmup: int, repeats: int, raw: bool) -> dict:
    """Export each module and time the files interleaved (raw samples when the timer has them)."""
    from .onnx_check import _feed, export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = str(Path(tmp) / f"{name}.onnx")
            export_onnx(m, inputs, paths[name])
        feeds = {}
        feed_of = lambda s: feeds.setdefault(id(s), _feed(s, inputs))  # noqa: E731
        if raw and hasattr(timer, "samples"):
            return timer.samples(paths, feed_of, warmup, repeats)
        return timer.files(paths, feed_of, warmup, repeats)


def measure_models(models: dict, inputs, threads=None, warmup: int = 5, repeats: int = 30, timer=None) -> dict:
    """Export each ``{name: module}`` and time the files interleaved: {name: (median, p10, p90)}."""
    return _timed(models, inputs, timer or OrtTimer(threads), warmup, repeats, raw=False)


def measure_samples(models: dict, inputs, threads=None, warmup: int = 5, repeats: int = 30, timer=None) -> dict:
    """{name: ms per repeat} of each module, exported and timed interleaved."""
    return _timed(models, inputs, timer or OrtTimer(threads), warmup, repeats, raw=True)


def paired_cut(t, t0) -> float:
    """1 - the median over repeats of ``t[r] / t0[r]`` (see ``measure_cuts``)."""
    return 1.0 - float(np.median(np.asarray(t) / np.asarray(t0)))


def measure_cuts(models: dict, inputs, threads=None, base: str = "orig", warmup: int = 5, repeats: int = 40,
                 timer=None) -> dict:
    """{name: (cut, median ms)}: each file's latency cut against ``base``, timed interleaved.
    The cut is 1 - the median over repeats of ``t_name[r] / t_base[r]``: runs of one repeat
    are adjacent in time, so load that drifts over the run cancels in each ratio (a ratio
    of medians lets it through: several points on this shared 2-core machine)."""
    out = _timed(models, inputs, timer or OrtTimer(threads), warmup, repeats, raw=True)
    if all(isinstance(v, tuple) for v in out.values()):  # a timer without samples: ratio of medians
        return {n: (1.0 - v[0] / out[base][0], v[0]) for n, v in out.items()}
    return {n: (paired_cut(t, out[base]), float(np.median(t))) for n, t in out.items()}
