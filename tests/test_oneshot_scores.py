"""One-shot rankings from BN statistics behind smooth activations (SiLU, GELU): in float32
``1 - p`` is exactly 1 for every live channel, so the ranking must come from ``log p``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import softprune_fx as sp


class ConvBnAct(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = act
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.ReLU()])
def test_one_shot_drops_the_least_alive_channels_first(act):
    torch.manual_seed(0)
    model = ConvBnAct(act).eval()
    with torch.no_grad():
        # every channel far from the dead threshold (p underflows in float32 behind SiLU),
        # channel c less alive the smaller its beta: a random permutation of 1..16
        order = torch.randperm(16)
        model.bn.bias.copy_(2.0 + order.float())
        model.bn.weight.fill_(0.1)
    x = torch.randn(1, 3, 8, 8)
    _, result = sp.prune_one_shot(model, (x,), ratio=0.25, round_to=None)
    dropped = sorted(result.drop["conv1"])
    assert dropped, result.drop
    expected = sorted(torch.argsort(order)[: len(dropped)].tolist())
    assert dropped == expected, (dropped, expected)


def test_dead_channel_behind_silu_is_scored_dead():
    """A BN-SiLU channel with beta = -6, gamma = 0.1 sits below SiLU's tail threshold."""
    model = ConvBnAct(nn.SiLU()).eval()
    with torch.no_grad():
        model.bn.bias.fill_(3.0)
        model.bn.weight.fill_(0.5)
        model.bn.bias[5], model.bn.weight[5] = -6.0, 0.1
    x = torch.randn(1, 3, 8, 8)
    _, result = sp.prune_one_shot(model, (x,), ratio=0.05, round_to=None)
    assert 5 in result.drop["conv1"]


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet_cifar_a", "densenet"])
def test_consumer_l1_of_wanted_channels_equals_the_full_sums(name):
    """One-shot computes consumer L1 norms only at the sites that read a gate channel: on
    those channels the sums must equal the sums over every site."""
    import numpy as np
    from zoo import ZOO

    from softprune_fx.oneshot import consumer_l1
    model, inputs = ZOO[name]()
    cg = sp.analyze(model.eval(), inputs)
    full = consumer_l1(cg, cg.index, model)
    rng = np.random.default_rng(0)
    wanted = rng.random(cg.index.size) < 0.3
    part = consumer_l1(cg, cg.index, model, wanted)
    assert full[wanted].sum() > 0
    assert np.array_equal(part[wanted], full[wanted])
