"""The one-shot pass runs with the cyclic collector paused and leaves it as it found it."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import softprune_fx as sp
import softprune_fx.api as api
import softprune_fx.finish as finish
from softprune_fx.passes.gcpause import gc_paused


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_collector_paused_inside_and_restored_after(monkeypatch):
    seen = []
    for mod, name in ((api, "capture"), (finish, "decide")):
        inner = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=inner, **k: (seen.append(gc.isenabled()), _f(*a, **k))[1])
    assert gc.isenabled()
    sp.prune_one_shot(_net(), (torch.randn(1, 3, 8, 8),), 0.3, round_to=None)
    assert gc.isenabled() and len(seen) == 2 and not any(seen)  # capture and decide ran paused


def test_a_collector_the_caller_switched_off_stays_off():
    gc.disable()
    try:
        sp.analyze(_net(), (torch.randn(1, 3, 8, 8),))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collector_restored_when_the_pass_raises():
    with pytest.raises(ValueError):
        with gc_paused():
            assert not gc.isenabled()
            raise ValueError("boom")
    assert gc.isenabled()
