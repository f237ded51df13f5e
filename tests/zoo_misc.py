"""Small special-purpose models for the zoo: tracing failures, functional params,
multiple inputs/outputs, GLU, pixel (un)shuffle and a set of `misc_*` op exercisers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, Head, conv_bn_relu, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, Head, conv_bn_relu, finish, seeded


# ----------------------------------------------------------------------------- untraceable
class DataDependent(nn.Module):
    """Data-dependent control flow: symbolic_trace must fail on it."""

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(x)
        return x * 0.5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 8)
        self.gate = DataDependent()
        self.conv2 = conv_bn_relu(8, 16)
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.conv2(self.gate(self.conv1(x))))


def untraceable():
    seeded()
    return finish(Untraceable(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- functional_bn
class FunctionalBN(nn.Module):
    """F.conv2d with an nn.Parameter weight and F.batch_norm on the module's own
    parameters/buffers (get_attr nodes, not modules, own the channel axis)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.weight = nn.Parameter(torch.randn(12, 8, 3, 3, generator=g) * 0.2)
        self.w = nn.Parameter(torch.rand(12, generator=g) + 0.5)
        self.b = nn.Parameter(torch.randn(12, generator=g) * 0.2)
        self.register_buffer("rm", torch.randn(12, generator=g) * 0.2)
        self.register_buffer("rv", torch.rand(12, generator=g) + 0.5)
        self.stem = conv_bn_relu(3, 8)
        self.conv = conv_bn_relu(12, 16)
        self.head = Head(16)

    def forward(self, x):
        x = F.conv2d(self.stem(x), self.weight)
        x = F.relu(F.batch_norm(x, self.rm, self.rv, self.w, self.b, training=False))
        return self.head(self.conv(x))


def functional_bn():
    seeded()
    return finish(FunctionalBN(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- multi_io
class MultiIO(nn.Module):
    """Two inputs (3 and 1 channels) through separate stems, fused by add; returns
    (logits, feature map): the feature map's channels reach an output."""

    def __init__(self):
        super().__init__()
        self.stem_a = conv_bn_relu(3, 8)
        self.stem_b = conv_bn_relu(1, 8)
        self.trunk = nn.Sequential(conv_bn_relu(8, 16), conv_bn_relu(16, 16))
        self.feat = nn.Conv2d(16, 12, 1)
        self.head = Head(16)

    def forward(self, a, b):
        x = self.trunk(self.stem_a(a) + self.stem_b(b))
        return self.head(x), self.feat(x)


def multi_io():
    seeded()
    return finish(MultiIO(), (BATCH, 3, 16, 16), (BATCH, 1, 16, 16))


# ----------------------------------------------------------------------------- glu
class GLUNet(nn.Module):
    """conv to 2C -> F.glu(dim=1) (a split and a multiply: halves i and C+i couple)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.conv2 = conv_bn_relu(8, 12)
        self.head = Head(12)

    def forward(self, x):
        x = F.glu(self.conv1(x), dim=1)
        return self.head(self.conv2(x))


def glu():
    seeded()
    return finish(GLUNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- pixel shuffle
class PixelShuffleNet(nn.Module):
    """PixelUnshuffle(2): C -> 4C (each channel becomes 4 consecutive channels);
    PixelShuffle(2): 4C -> C (each 4 consecutive channels become one)."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 4)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.conv2 = conv_bn_relu(16, 16)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv4 = conv_bn_relu(8, 8)
        self.head = Head(8)

    def forward(self, x):
        x = self.conv2(self.unshuffle(self.conv1(x)))
        x = self.shuffle(self.conv3(x))
        return self.head(self.conv4(x))


def pixel_shuffle():
    seeded()
    return finish(PixelShuffleNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- misc_*
class MiscSlicing(nn.Module):
    """torch.narrow on dim 1, x[:, ::2], x[:, 1:5], torch.split(x, [6, 10], 1), then
    .contiguous() and .to(x.dtype)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.conv_a = conv_bn_relu(18, 16)
        self.conv_b = conv_bn_relu(10, 16)
        self.head = Head(16)

    def forward(self, x):
        x = self.stem(x)
        a = torch.narrow(x, 1, 2, 8)
        b = x[:, ::2]
        c = x[:, 1:5]
        d, e = torch.split(x, [6, 10], 1)
        y = torch.cat([a + b, c, d], 1).contiguous().to(x.dtype)
        return self.head(self.conv_a(y) + self.conv_b(e))


class MiscNorms(nn.Module):
    """InstanceNorm2d(affine), GroupNorm(C, C) (exact: one channel per group),
    GroupNorm(2, C) (inexact), Dropout, Identity."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(12, 12), nn.ReLU(),
            nn.Dropout(0.3), nn.Identity(),
            nn.Conv2d(12, 12, 3, padding=1), nn.GroupNorm(2, 12), nn.ReLU(),
        )
        self.head = Head(12)

    def forward(self, x):
        return self.head(self.body(x))


class MiscResample(nn.Module):
    """ConvTranspose2d (weight is in x out), Upsample, ReflectionPad2d + unpadded conv."""

    def __init__(self):
        super().__init__()
        self.down = conv_bn_relu(3, 8, 3, 2)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.bn = nn.BatchNorm2d(12)
        self.down2 = conv_bn_relu(12, 12, 3, 2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(12, 16, 3)
        self.head = Head(16)

    def forward(self, x):
        x = F.relu(self.bn(self.up(self.down(x))))
        x = self.upsample(self.down2(x))
        return self.head(self.conv(self.pad(x)))


class MiscInplace(nn.Module):
    """In-place `y += x` and `y.mul_(gate)`, clamp(min=0), a sub of two branches and a
    div by a constant."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 12)
        self.conv = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
        self.gate = nn.Conv2d(12, 12, 1)
        self.conv_a = nn.Conv2d(12, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(12, 16, 1)
        self.head = Head(16)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        y += x
        y.mul_(torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1))))
        y = y.clamp(min=0)
        z = (self.conv_a(y) - self.conv_b(y)) / 2.0
        return self.head(z)


class MiscReduce(nn.Module):
    """Spatial mean (keepdim) and amax over spatial dims feeding a gate; a (N,1,H,W)
    spatial attention map times x (broadcast: couples nothing)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.fc = nn.Conv2d(16, 16, 1)
        self.spatial = nn.Conv2d(16, 1, 3, padding=1)
        self.conv = conv_bn_relu(16, 16)
        self.head = Head(16)

    def forward(self, x):
        x = self.stem(x)
        g = x.mean((2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True)
        x = x * torch.sigmoid(self.fc(g))
        att = torch.sigmoid(self.spatial(x))
        x = att * x
        return self.head(self.conv(x))


def _misc(cls):
    def build():
        seeded()
        return finish(cls(), (BATCH, 3, 16, 16))
    build.__name__ = build.__qualname__ = "build_" + cls.__name__
    build.__doc__ = cls.__doc__
    return build


ZOO_MISC = {
    "untraceable": untraceable,
    "functional_bn": functional_bn,
    "multi_io": multi_io,
    "glu": glu,
    "pixel_shuffle": pixel_shuffle,
    "misc_slicing": _misc(MiscSlicing),
    "misc_norms": _misc(MiscNorms),
    "misc_resample": _misc(MiscResample),
    "misc_inplace": _misc(MiscInplace),
    "misc_reduce": _misc(MiscReduce),
}
