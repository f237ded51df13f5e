"""Surgery re-runs the channel flow on the pruned graph and compares every layout with
the planned, filtered one (DESIGN.md section 5): a plan that disagrees is refused."""
import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import softprune_fx as sp
from conftest import outputs, random_drop, rel_err
from softprune_fx.passes.errors import SurgeryError
from softprune_fx.passes.surgery import _weights_only, check_layouts, planned_classes


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def planned_for(cg, drop):
    plan = cg.plan(drop)
    nodes = [n for n in cg.gm.graph.nodes if isinstance(cg.flow.layouts.get(n), np.ndarray)
             and isinstance(n.meta.get("val"), torch.Tensor)]
    return {n.name: planned_classes(cg.flow, plan, n) for n in nodes}


def test_planned_classes_filter_the_dropped_positions():
    cg = sp.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))
    gid = next(g.id for g in cg.groups if "a" in g.producers)
    planned = planned_for(cg, {gid: [1, 4]})
    assert planned["a"].shape == (1, 6, 1, 1) and planned["add"].shape == (1, 6, 1, 1)
    assert (planned["a"] == planned["add"]).all() and (planned["b"] == planned["add"]).all()


def test_check_layouts_accepts_the_real_plan_and_refuses_a_wrong_shape():
    model, x = Residual().eval(), (torch.randn(1, 3, 8, 8),)
    cg = sp.analyze(model, x)
    gid = next(g.id for g in cg.groups if "a" in g.producers)
    planned = planned_for(cg, {gid: [1, 4]})
    pruned = cg.prune({gid: [1, 4]})  # apply_surgery ran check_layouts already
    by_name = {n.name: n for n in pruned.graph.nodes}
    from softprune_fx.passes.capture import MetaShapeProp
    MetaShapeProp(pruned).propagate(*x)
    check_layouts(pruned, {by_name[k]: v for k, v in planned.items() if k in by_name})
    coarser = dict(planned)
    coarser["b"] = planned["b"] + 1000  # other class names: couplings may differ, shapes may not
    check_layouts(pruned, {by_name[k]: v for k, v in coarser.items() if k in by_name})
    short = dict(planned)
    short["add"] = planned["add"][:, :5]
    with pytest.raises(SurgeryError, match="pruned layout"):
        check_layouts(pruned, {by_name[k]: v for k, v in short.items() if k in by_name})


class MeanGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y * y.mean(1, keepdim=True))


def test_check_layouts_refuses_a_planned_channel_without_identity():
    """A plan that says the channel mean still carries a channel is refused."""
    model, x = MeanGate().eval(), (torch.randn(1, 3, 8, 8),)
    cg = sp.analyze(model, x)
    gid = next(g.id for g in cg.groups if "a" in g.producers)
    planned = planned_for(cg, {gid: [2]})
    assert (planned["mean"] < 0).all()  # a reduction over channels has no channel identity
    pruned = cg.prune({gid: [2]})
    from softprune_fx.passes.capture import MetaShapeProp
    MetaShapeProp(pruned).propagate(*x)
    by_name = {n.name: n for n in pruned.graph.nodes}
    wrong = dict(planned)
    wrong["mean"] = planned["a"][:, :1]  # (1, 1, 1, 1): one class
    with pytest.raises(SurgeryError, match="no channel identity"):
        check_layouts(pruned, {by_name[k]: v for k, v in wrong.items() if k in by_name})


# the check leaves parameter-only values (a layer scale's reshape) to the value they meet
class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.conv(x) * self.gamma.reshape(1, -1, 1, 1).abs()


def test_weights_only_holds_parameter_chains_and_nothing_fed_by_inputs():
    gm = fx.symbolic_trace(LayerScale())
    names = {n.name for n in _weights_only(gm)}
    assert names == {"gamma", "reshape", "abs_1"}
    assert {"x", "conv", "mul"}.isdisjoint(names)


class CachedAnchors(nn.Module):
    """YOLO's pose head: anchors cached by a real forward (the trace reads them as a constant)
    are added to keypoint channels written back in place."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.k = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1)
        self.anchors = None

    def forward(self, x):
        f = torch.relu(self.bn(self.a(x)))
        if self.anchors is None or self.anchors.shape[-1] != f.shape[2] * f.shape[3]:
            self.anchors = torch.arange(f.shape[2] * f.shape[3], dtype=f.dtype)
        y = self.k(f).flatten(2).clone()
        y[:, 0::3] = y[:, 0::3] * 2.0 + (self.anchors - 0.5)
        return y


def test_check_layouts_skips_values_the_analysis_did_not_follow():
    """The constant meets the keypoint channels across axes: the analysis gives up on the sum
    (UNKNOWN, freezing what it reads), so the pruned graph's layout there is not compared."""
    model, x = CachedAnchors().eval(), torch.randn(1, 3, 6, 6)
    model(x)
    cg = sp.analyze(model, (x,))
    drop = random_drop(cg, 0)
    assert drop and "a" in drop
    assert rel_err(outputs(sp.masked(model, (x,), drop), (x,)), outputs(sp.prune_channels(model, (x,), drop), (x,))) <= 1e-6
