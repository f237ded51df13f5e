"""The latency model with a fake timer: tables, interpolation, efficient points, caching,
and the decision on a latency budget. Deterministic; nothing here is timed for real."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from softprune_fx.api import analyze
from softprune_fx.cost import CostModel
from softprune_fx.decide import decide
from softprune_fx.latency import LatencyCost, grid_widths
from softprune_fx.latency_cache import LatencyCache, Table, efficient


class Net(nn.Module):
    """stem 3x3 conv (group ``a``, 64) -> 1x1 conv (group ``b``, 64) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(64)
        self.b = nn.Conv2d(64, 64, 1)
        self.bn_b = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(x.mean((2, 3)))


class FakeTimer:
    """ms from the tiny graph's shapes: 3x3 convs cost ``i * o / 100``; 1x1 convs cost
    as much as their output width rounded *up* to 64 (a staircase: narrower is not
    faster); the rest 0.01. Whole files: a fixed 5 ms. Counts its calls."""

    def __init__(self):
        self.op_calls, self.file_calls, self.threads = 0, 0, None

    def ops(self, jobs):
        out = []
        for model, feed in jobs:
            self.op_calls += 1
            w = numpy_helper.to_array(model.graph.initializer[0])
            i, o = feed["X"].shape[1] if feed["X"].ndim == 4 else feed["X"].shape[-1], w.shape[0]
            if w.ndim == 4 and w.shape[-1] == 3:
                out.append(i * o / 100.0)
            elif w.ndim == 4:
                out.append(float(np.ceil(o / 64.0)))
            else:
                out.append(0.01)
        return out

    def files(self, paths, feed_of, warmup=5, repeats=30):
        self.file_calls += 1
        return {name: (5.0, 5.0, 5.0) for name in paths}


@pytest.fixture
def net():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 16, 16)
    return model, x, analyze(model, (x,))


def _lat(net, tmp_path, timer, **kw):
    model, x, cg = net
    return LatencyCost(cg, cg.index, model, (x,), latency_cache=tmp_path, timer=timer, **kw)


def test_table_bilinear_and_extension():
    tab = Table.of([16, 32], [8, 16], [[1.0, 2.0], [3.0, 4.0]])
    assert tab.value_grad(16, 8)[0] == pytest.approx(1.0)
    assert tab.value_grad(24, 12) == pytest.approx((2.5, 2.0 / 16, 1.0 / 8))
    assert tab.value_grad(0, 0)[0] == 0.0           # no channels, no time
    assert tab.value_grad(8, 8)[0] == pytest.approx(0.5)  # below the grid: towards 0 at 0
    assert tab.value_grad(32, 16)[0] == pytest.approx(4.0)


def test_efficient_points_drop_widths_no_faster_than_a_wider_one():
    assert efficient([16, 32, 48, 64], [1.0, 2.0, 4.0, 4.0]) == [16, 32, 64]
    assert efficient([16, 32, 48, 64], [3.0, 3.0, 3.0, 3.0]) == [64]
    assert efficient([64, 16], [2.0, 1.0]) == [16, 64]


def test_grid_widths_are_block_multiples_within_the_group():
    pts = grid_widths(256)
    assert pts[-1] == 256 and all(p % 8 == 0 and 0 < p <= 256 for p in pts) and len(pts) >= 5
    assert all(p % 12 == 0 or p == 96 for p in grid_widths(96, multiple=12))
    assert grid_widths(4) == [1, 2, 3, 4] or grid_widths(4)[-1] == 4
    assert min(grid_widths(512)) == 64          # 1/8: a large cut must be reachable on the tables


def test_prediction_marginal_and_calibration(net, tmp_path):
    timer = FakeTimer()
    lat = _lat(net, tmp_path, timer)
    full = np.ones(lat.index.size)
    assert lat.total0 == pytest.approx(5.0) and lat.flops(full) == pytest.approx(5.0)  # calibrated
    a, b = lat.index.ids("a"), lat.index.ids("b")
    keep = full.copy()
    keep[a[32:]] = 0
    # 3x3 conv a: 3 * 64 / 100 -> 3 * 32 / 100; its reader b's cost does not follow its input
    assert lat.flops(full) - lat.flops(keep) == pytest.approx(3 * 32 / 100.0)
    assert lat.ratio(keep) == pytest.approx(0.96 / 100 / 5.0 * 100)
    grad = lat.marginal(keep)
    eps = np.zeros_like(keep)
    eps[a[0]] = 1e-3
    assert grad[a[0]] == pytest.approx((lat.flops(keep + eps) - lat.flops(keep - eps)) / 2e-3, rel=1e-6)
    assert lat.points("b") == [64]                     # the staircase: no narrower b is faster
    assert lat.points("a") == grid_widths(64)


class LoadedTimer(FakeTimer):
    """The machine under load: every op and whole file takes ``slow`` times as long."""

    def __init__(self, slow: float):
        super().__init__()
        self.slow = slow

    def ops(self, jobs):
        return [self.slow * v for v in super().ops(jobs)]

    def files(self, paths, feed_of, warmup=5, repeats=30):
        self.file_calls += 1
        return {name: (5.0 * self.slow,) * 3 for name in paths}


def test_second_run_times_no_op_but_recalibrates_the_whole_model(net, tmp_path):
    """Op tables come from the cache; the whole-model constant is measured again, so a
    second run under other load predicts that run's original latency (a cached constant
    would keep predicting the first run's 5 ms)."""
    first, second = FakeTimer(), LoadedTimer(2.0)
    lat1 = _lat(net, tmp_path, first)
    assert first.op_calls > 0 and first.file_calls == 1
    lat = _lat(net, tmp_path, second)
    assert (second.op_calls, lat.measured_ops) == (0, 0)
    assert second.file_calls == 1 and lat.measured0 == pytest.approx(10.0)
    assert lat.total0 == pytest.approx(10.0) and lat1.total0 == pytest.approx(5.0)
    assert lat.ops0 == pytest.approx(lat1.ops0)           # the same (cached) tables
    entry = {"spec": {"op": "conv"}, "i": [8], "o": [8]}
    keys = {LatencyCache(t, tmp_path, ort=v, cpu="x").key(entry) for t in (None, 1, 2) for v in ("1.0", "1.1")}
    assert len(keys) == 6
    assert LatencyCache(1, tmp_path, ort="1.0", cpu="x").key(entry) != LatencyCache(1, tmp_path, ort="1.0",
                                                                                    cpu="y").key(entry)
    other = FakeTimer()
    _lat(net, tmp_path, other, ort_threads=1)             # another thread count: measured again
    assert other.op_calls == first.op_calls


def test_env_var_names_the_cache(net, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPRUNE_LATENCY_CACHE", str(tmp_path / "env"))
    model, x, cg = net
    LatencyCost(cg, cg.index, model, (x,), timer=FakeTimer())
    assert list((tmp_path / "env").glob("*.json"))


def test_decision_meets_a_latency_budget_with_the_latency_optimal_keep_set(net, tmp_path):
    """FLOPs rank b's channels as worth cutting (the 1x1 conv holds most FLOPs per kept
    channel of b); in latency, cutting b saves nothing (staircase), so the latency decision
    cuts only a, and meets the budget that the FLOPs decision's keep set misses."""
    model, x, cg = net
    lat = _lat(net, tmp_path, FakeTimer(), calibrate=False)
    flops = lat.flops_model
    index = cg.index
    scores, keep0 = np.ones(index.size), np.ones(index.size, bool)
    ratio = lat.ratio(np.where(np.isin(np.arange(index.size), index.ids("a")[32:]), 0.0, 1.0))
    by_lat = decide(cg, index, lat, scores, keep0, ratio, round_to="auto", tol=0.02)
    by_flops = decide(cg, index, flops, scores, keep0, flops.ratio(by_lat.keep), round_to="auto", tol=0.02)
    assert by_lat.counts["b"] == 64 and by_lat.counts["a"] < 64
    assert abs(lat.ratio(by_lat.keep) - ratio) <= 0.02
    assert by_flops.counts["b"] < 64                      # the FLOPs-optimal set differs ...
    assert lat.ratio(by_flops.keep) < ratio - 0.02       # ... and misses the latency budget


def test_decision_on_table_points_keeps_flat_groups_whole(net, tmp_path):
    """With the table's efficient points as candidates, b (no narrower width is faster)
    stays whole and a takes only measured widths."""
    model, x, cg = net
    lat = _lat(net, tmp_path, FakeTimer(), calibrate=False)
    index = cg.index
    scores, keep0 = np.ones(index.size), np.ones(index.size, bool)
    ratio = lat.ratio(np.where(np.isin(np.arange(index.size), index.ids("a")[32:]), 0.0, 1.0))
    d = decide(cg, index, lat, scores, keep0, ratio, round_to="auto", tol=0.02, points=lat.points)
    assert d.counts["b"] == 64 and d.counts["a"] in lat.points("a") and d.counts["a"] < 64


class FileSizeTimer(FakeTimer):
    """Whole files cost their size (weights dominate): a pruned file is faster."""

    def files(self, paths, feed_of, warmup=5, repeats=30):
        import os
        self.file_calls += 1
        return {name: (os.path.getsize(p) / 1e5,) * 3 for name, p in paths.items()}


def test_prune_one_shot_latency_target_fills_the_latency_fields(net, tmp_path, monkeypatch):
    import softprune_fx.latency as latency
    from softprune_fx import prune_one_shot
    monkeypatch.setattr(latency, "OrtTimer", lambda threads=None: FileSizeTimer())
    model, x, _ = net
    pruned, res = prune_one_shot(model, (x,), 0.3, target="latency", ort_threads=1, latency_cache=tmp_path)
    d = res.to_dict()
    assert d["target"] == "latency" and d["ort_threads"] == 1 and 1 <= len(d["latency_rounds"]) <= 4
    assert d["achieved_ratio"] == pytest.approx(1 - d["ort_ms_after"] / d["ort_ms_before"])
    assert d["flops_ratio"] == pytest.approx(1 - d["flops_after"] / d["flops_before"])
    assert d["ort_pred_error"] == pytest.approx(d["ort_pred_ms_after"] / d["ort_ms_after"] - 1)
    assert d["ort_pred_error_rel"] == pytest.approx((1 - d["ort_pred_cut"]) / (1 - d["achieved_ratio"]) - 1)
    from softprune_fx.artifacts import base_report
    report = base_report(res, {})  # report.json carries the tables' own prediction beside the corrected one
    assert report["ort_pred_cut_tables"] == d["ort_pred_cut_tables"] is not None
    assert report["ort_pred_cut"] == d["ort_pred_cut"]
    with pytest.raises(Exception, match="target"):
        prune_one_shot(model, (x,), 0.3, target="speed")


class FastWholeTimer(FakeTimer):
    """The whole model runs in half its ops' sum (the tiny graphs' own reorders)."""

    def files(self, paths, feed_of, warmup=5, repeats=30):
        self.file_calls += 1
        return {name: (1.465,) * 3 for name in paths}   # half of the fake ops' 2.93 ms


def test_a_whole_model_faster_than_its_ops_scales_them(net, tmp_path):
    """A negative constant would predict a cut twice the tables' (and cuts past 100%); a
    scale keeps the predicted fraction the tables' own."""
    lat = _lat(net, tmp_path, FastWholeTimer())
    assert lat.ops0 == pytest.approx(2.93) and (lat.scale, lat.constant) == (pytest.approx(0.5), 0.0)
    keep = np.ones(lat.index.size)
    keep[lat.index.ids("a")[32:]] = 0
    assert lat.total0 == pytest.approx(1.465)
    assert lat.ratio(keep) == pytest.approx(0.96 / 2.93)
