"""The post-surgery layout check leaves parameter-only values (a layer scale's reshape) to
the value they meet; everything computed from a model input is still compared."""
import torch
import torch.fx as fx
from torch import nn

from softprune_fx.passes.surgery import _weights_only


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
