"""round_to="auto" in FLOPs mode: widths from the latency tables' efficient points when this
runtime's tables are cached, the fixed 16/8 step otherwise, and never any ORT timing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import softprune_fx.latency as latency
from softprune_fx import prune_one_shot
from softprune_fx.api import analyze
from softprune_fx.latency import LatencyCost, cached_latency_cost
from test_latency import FakeTimer, Net


class StepTimer(FakeTimer):
    """As FakeTimer, but 1x1 convs step at 32 outputs: b's efficient widths are 32 and 64."""

    def ops(self, jobs):
        out = super().ops(jobs)
        for k, (model, _) in enumerate(jobs):
            w = model.graph.initializer[0].dims
            if len(w) == 4 and w[-1] == 1:
                out[k] = float(np.ceil(w[0] / 32.0))
        return out


def _no_ort(threads=None):
    raise AssertionError("a default prune must not time ORT")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPRUNE_LATENCY_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "OrtTimer", _no_ort)
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 16, 16)
    return model, x, analyze(model, (x,))


def test_cached_latency_cost_is_none_until_the_tables_are_cached(setup):
    model, x, cg = setup
    assert cached_latency_cost(cg, cg.index, model, (x,)) is None
    timer = StepTimer()
    LatencyCost(cg, cg.index, model, (x,), timer=timer)     # ORT's default threads, the env's cache
    lat = cached_latency_cost(cg, cg.index, model, (x,))
    assert lat is not None and lat.points("b") == [32, 64] and timer.op_calls > 0
    assert cached_latency_cost(cg, cg.index, model, (x,), ort_threads=1) is None   # another runtime


def test_default_prune_takes_the_cached_tables_widths(setup):
    """Cold: the FLOPs decision cuts the 1x1 conv b (most FLOPs) to 48 on the fixed 16-step.
    Warm: 48 is no faster than 64 in b's table, so the widths come from the tables' points
    (a at 48, b whole); the FLOPs target holds within 1 point both times, nothing is timed."""
    model, x, cg = setup
    ratio = 0.25                                   # a at 48 of 64 removes a quarter of the FLOPs
    _, cold = prune_one_shot(model, (x,), ratio)
    assert cold.widths["b"][1] in (16, 32, 48), cold.widths           # FLOPs cut b, on the fixed step
    timer = StepTimer()
    LatencyCost(cg, cg.index, model, (x,), timer=timer)
    calls = timer.op_calls
    _, warm = prune_one_shot(model, (x,), ratio)
    assert timer.op_calls == calls
    assert (warm.widths["a"], warm.widths["b"]) == ((64, 48), (64, 64)) and not warm.rounding_dropped
    assert abs(cold.achieved_ratio - ratio) <= 0.01 and abs(warm.achieved_ratio - ratio) <= 0.01
    _, fixed = prune_one_shot(model, (x,), ratio, round_to=16)   # an explicit step ignores the tables
    assert fixed.widths["b"][1] < 64
