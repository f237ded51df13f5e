"""SoftPruner(target="latency"): the controller steers the hard-rule keep set's predicted
latency, on a made-up table where FLOPs and latency disagree (fake timers; nothing timed)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

import softprune_fx.latency as latency
from softprune_fx import SoftPruner
from softprune_fx.api import analyze
from test_latency import FakeTimer, Net

CONSTANT_MS = 1.0


class GraphTimer(FakeTimer):
    """Tiny graphs as ``FakeTimer`` (3x3 convs ``i * o / 100`` ms, 1x1 convs a staircase
    flat up to 64 outputs, linear 0.01); a whole file is the same rule summed over its
    Conv and Gemm nodes plus a constant, so the tables predict it exactly."""

    def files(self, paths, feed_of, warmup=5, repeats=30):
        self.file_calls += 1
        return {name: (self._whole(path),) * 3 for name, path in paths.items()}

    @staticmethod
    def _whole(path) -> float:
        model = onnx.load(path)
        shapes = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
        ms = CONSTANT_MS
        for node in model.graph.node:
            if node.op_type == "Conv":
                o, per, *k = shapes[node.input[1]]
                group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
                ms += per * group * o / 100.0 if k == [3, 3] else math.ceil(o / 64.0)
            elif node.op_type in ("Gemm", "MatMul"):
                ms += 0.01
        return ms


def _train(pruner, steps: int = 160):
    torch.manual_seed(0)
    net = pruner.model.train()
    opt = torch.optim.SGD(pruner.param_groups(1e-4), lr=0.1, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(net(x), y) + pruner.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pruner.progress()


@pytest.fixture
def fake_ort(monkeypatch):
    monkeypatch.setattr(latency, "OrtTimer", lambda threads=None: GraphTimer())


def test_softpruner_latency_target_steers_predicted_latency(fake_ort, tmp_path):
    """Only the 3x3 conv ``a`` costs latency (``b``'s table is flat), while ``b`` holds most
    FLOPs: the latency controller and decision reach the latency target, where the FLOPs
    pruner at the same ratio reaches a far smaller latency cut."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(1, 3, 16, 16)
    cg = analyze(model.eval(), (x,))
    lat = latency.LatencyCost(cg, cg.index, model, (x,), latency_cache=tmp_path)
    keep = np.ones(cg.index.size)
    keep[cg.index.ids("a")[32:]] = 0.0
    ratio = lat.ratio(keep)                        # a at 32 of 64, b whole: a measured grid point
    assert 0.15 < ratio < 0.35 and lat.ratio(np.where(np.isin(np.arange(cg.index.size), cg.index.ids("b")[16:]),
                                                      0.0, 1.0)) == pytest.approx(0.0)
    pruner = SoftPruner(model.train(), (x,), ratio, target="latency", ort_threads=1, latency_cache=tmp_path)
    assert pruner.bank.cost is pruner.lat          # the controller measures predicted latency
    info = _train(pruner)
    assert abs(info["hard_latency_ratio"] - ratio) <= 0.05, info
    pruned, res = pruner.finalize()
    assert res.target == "latency" and res.ort_threads == 1
    assert abs(res.achieved_ratio - ratio) <= 0.02      # measured (fake) latency cut on the pruned file
    assert abs(res.ort_pred_cut - ratio) <= 0.02 and res.training_cut == pytest.approx(info["hard_latency_ratio"])
    assert res.flops_ratio == pytest.approx(1 - res.flops_after / res.flops_before)
    assert res.max_abs_diff < 1e-4 and res.widths["a"] == (64, 32)   # the latency is in a

    torch.manual_seed(0)
    flops = SoftPruner(Net().train(), (x,), ratio)
    assert flops.lat is None and "hard_latency_ratio" not in _train(flops)
    _, fres = flops.finalize()
    assert abs(fres.achieved_ratio - ratio) <= 0.02     # a FLOPs cut ...
    assert lat.ratio(fres.analysis.index.keep_from_drop(fres.drop)) < 0.05  # ... cuts b, no latency
