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


# ----------------------------------------------------------------------------- bnact_blocks
class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls F.batch_norm on its
    own buffers and parameters, then ReLU. torch.fx traces into it (it is not a torch.nn
    class), so get_attr nodes, not a module, carry the BN's channel axis."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class BNActBlocks(nn.Module):
    """Residual stream read by several convs, with private BNAct -> conv chains on it (site
    groups whose BN is functional): a pre-activation block (BNAct -> 3x3 conv) and a
    depthwise-separable block (depthwise conv -> BNAct -> 1x1 conv, as in timm's MixNet,
    MobileNetV4, DPN and DenseNet)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pre_bn, self.pre_conv1 = BNAct(16), nn.Conv2d(16, 12, 3, padding=1)
        self.pre_bn2, self.pre_conv2 = BNAct(12), nn.Conv2d(12, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw_bn, self.pw = BNAct(16), nn.Conv2d(16, 16, 1)
        self.head_bn, self.head = BNAct(16), Head(16)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pre_conv2(self.pre_bn2(self.pre_conv1(self.pre_bn(x))))
        x = x + self.pw(self.dw_bn(self.dw(x)))
        return self.head(self.head_bn(x))


def bnact_blocks():
    seeded()
    return finish(BNActBlocks(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- count_sized
class CountSized(nn.Module):
    """A size read from one tensor's channel axis reshapes another tensor whose channel axis
    is not those channels (EdgeNeXt's XCA sizes heads x head_dim by the stream's width): the
    counted channels must keep their extent, so they are frozen. A second reshape by a
    count of its own channels (``z.view(B, C, -1)``) stays prunable."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.proj = nn.Conv2d(16, 16, 1)
        self.mix = conv_bn_relu(16, 12)
        self.head = Head(12)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        y = torch.roll(self.proj(x), 1, dims=1).flatten(2)   # channels no longer followed
        z = self.mix(y.reshape(b, c, h, w))
        bz, cz = z.shape[:2]
        return self.head(z.view(bz, cz, -1).view(bz, cz, h, w))


def count_sized():
    seeded()
    return finish(CountSized(), (BATCH, 3, 16, 16))


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
    GroupNorm(2, C) (exact: a mask site, balanced per group), Dropout, Identity."""

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
    "bnact_blocks": bnact_blocks,
    "count_sized": count_sized,
    "multi_io": multi_io,
    "glu": glu,
    "pixel_shuffle": pixel_shuffle,
    "misc_slicing": _misc(MiscSlicing),
    "misc_norms": _misc(MiscNorms),
    "misc_resample": _misc(MiscResample),
    "misc_inplace": _misc(MiscInplace),
    "misc_reduce": _misc(MiscReduce),
}
