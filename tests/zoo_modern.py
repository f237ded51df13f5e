"""Modern blocks for the zoo: ConvNeXt, Res2Net, CBAM, FPN.

Couplings: channels-last LayerNorm and layer scale after permute; a hand-written
channels-first LayerNorm (inexact: statistics over channels); chunk + hierarchical adds +
cat; a shared MLP called twice; channel reductions (mean/max over dim 1); interpolate +
add across pyramid levels; dict outputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, Head, LayerNorm2d, conv_bn_relu, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, Head, LayerNorm2d, conv_bn_relu, finish, seeded


# ----------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    """7x7 depthwise -> permute to NHWC -> LayerNorm(C) -> Linear(C,4C) -> GELU ->
    Linear(4C,C) -> layer scale gamma * x -> permute back -> residual add."""

    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)  # random, not 1e-6: sharp tests

    def forward(self, x):
        inp = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return inp + x


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16), depths=(2, 1), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(dims[0]) for _ in range(depths[0])))
        self.down = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(dims[1]) for _ in range(depths[1])))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


def convnext():
    seeded()
    return finish(ConvNeXt(), (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- Res2Net
class Bottle2neck(nn.Module):
    """1x1 conv -> chunk into `scale` pieces -> hierarchical 3x3 convs, each fed the
    previous piece's output added to the next piece -> cat (last piece passed through)
    -> 1x1 conv -> residual."""

    def __init__(self, inp, out, width=4, scale=4):
        super().__init__()
        self.scale = scale
        self.conv1 = conv_bn_relu(inp, width * scale, 1)
        self.convs = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in range(scale - 1))
        self.conv3 = nn.Sequential(nn.Conv2d(width * scale, out, 1, bias=False), nn.BatchNorm2d(out))
        self.downsample = None
        if inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        spx = torch.chunk(self.conv1(x), self.scale, 1)
        sp = self.convs[0](spx[0])
        outs = [sp]
        for i in range(1, self.scale - 1):
            sp = self.convs[i](sp + spx[i])
            outs.append(sp)
        outs.append(spx[self.scale - 1])
        out = self.conv3(torch.cat(outs, 1))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Res2Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 3, 2)
        self.layer1 = nn.Sequential(Bottle2neck(16, 16), Bottle2neck(16, 32))
        self.head = Head(32)

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def res2net():
    seeded()
    return finish(Res2Net(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- CBAM
class ChannelAttention(nn.Module):
    """Shared MLP (two 1x1 convs) called on avg- and max-pooled maps; sum, sigmoid, gate."""

    def __init__(self, c, r=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(c // r, c, 1, bias=False))

    def forward(self, x):
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """mean and max over channels (dim 1) -> cat -> 7x7 conv -> sigmoid -> (N,1,H,W) map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x):
        avg = torch.mean(x, dim=1, keepdim=True)
        mx = torch.max(x, dim=1, keepdim=True)[0]
        s = torch.sigmoid(self.conv(torch.cat([avg, mx], 1)))
        return x * s


class CBAMBlock(nn.Module):
    """BasicBlock with CBAM applied to the residual branch before the add."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c))
        self.ca = ChannelAttention(c)
        self.sa = SpatialAttention()

    def forward(self, x):
        out = self.sa(self.ca(self.body(x)))
        return F.relu(out + x)


class CBAMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.block = CBAMBlock(16)
        self.conv = conv_bn_relu(16, 24, 3, 2)
        self.head = Head(24)

    def forward(self, x):
        return self.head(self.conv(self.block(self.stem(x))))


def cbam():
    seeded()
    return finish(CBAMNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- FPN
class FPN(nn.Module):
    """3-stage backbone, lateral 1x1 convs, nearest x2 upsampling + add top-down, 3x3
    output convs; returns {"p3", "p4", "p5"} (all reach outputs: frozen pyramid width)."""

    def __init__(self, c=16):
        super().__init__()
        self.c3 = nn.Sequential(conv_bn_relu(3, 8, 3, 2), conv_bn_relu(8, 8))
        self.c4 = nn.Sequential(conv_bn_relu(8, 16, 3, 2), conv_bn_relu(16, 16))
        self.c5 = nn.Sequential(conv_bn_relu(16, 32, 3, 2), conv_bn_relu(32, 32))
        self.lat3, self.lat4, self.lat5 = (nn.Conv2d(i, c, 1) for i in (8, 16, 32))
        self.out3, self.out4, self.out5 = (nn.Conv2d(c, c, 3, padding=1) for _ in range(3))

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat5(c5)
        p4 = self.lat4(c4) + F.interpolate(p5, scale_factor=2, mode="nearest")
        p3 = self.lat3(c3) + F.interpolate(p4, scale_factor=2, mode="nearest")
        return {"p3": self.out3(p3), "p4": self.out4(p4), "p5": self.out5(p5)}


def fpn():
    seeded()
    return finish(FPN(), (BATCH, 3, 32, 32))


ZOO_MODERN = {
    "convnext": convnext,
    "res2net": res2net,
    "cbam": cbam,
    "fpn": fpn,
}
