"""Shared helpers for the test zoo: norm randomisation, seeding, small building blocks."""
from __future__ import annotations

import torch
import torch.nn as nn

SEED = 0
BATCH = 2

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm written by hand (ConvNeXt): statistics over dim 1."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def randomize_norms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Randomise every norm's affine params and running stats so comparisons are sharp.

    weight ~ U(0.5, 1.5), bias ~ N(0, 0.2), running_mean ~ N(0, 0.2),
    running_var ~ U(0.5, 1.5). Covers BatchNorm/InstanceNorm (1d/2d/3d), GroupNorm,
    LayerNorm and the hand-written LayerNorm2d.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORMS + (LayerNorm2d,)):
                continue
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            rm = getattr(m, "running_mean", None)
            rv = getattr(m, "running_var", None)
            if w is not None:
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
            if b is not None:
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            if rm is not None:
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.2)
            if rv is not None:
                rv.copy_(torch.rand(rv.shape, generator=g) + 0.5)
    return model


def seeded(seed: int = SEED) -> None:
    """Seed torch's global RNG (builders call this before constructing layers)."""
    torch.manual_seed(seed)


def finish(model: nn.Module, *shapes, seed: int = SEED):
    """Randomise norms, switch to eval, and make deterministic example inputs."""
    randomize_norms(model, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = tuple(torch.randn(s, generator=g) for s in shapes)
    return model, inputs


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) -> BN -> activation, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


def channel_shuffle(x, groups: int):
    """Channel shuffle by view/transpose (ShuffleNet), sizes read from x.size()."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class Head(nn.Module):
    """Adaptive average pool -> torch.flatten -> Linear."""

    def __init__(self, c: int, n: int = 10):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


__all__ = ["BATCH", "SEED", "Head", "LayerNorm2d", "channel_shuffle", "conv_bn_relu",
           "finish", "randomize_norms", "seeded"]
