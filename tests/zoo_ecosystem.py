"""Zoo models written the way ecosystem libraries write them (issue 9): Python reads shapes.

- ``yolo``: a YOLOv8-style net as ultralytics writes it: Conv-BN-SiLU, C2f with
  ``list(self.cv1(x).chunk(2, 1))``, SPPF, a Detect head whose anchors are computed from
  the feature shapes and cached on ``self`` under ``if self.dynamic or self.shape != shape``,
  and ``forward(self, x, *args, **kwargs)``.
- ``tf_same``: TF-style "same" padding computed from ``x.shape`` in Python (Hugging Face
  MobileNetV2, timm's ``pad_same``: ``max``, ``math.ceil``, ``%``).
- ``size_check``: a root forward that checks ``h % 32`` and raises (smp FPN).
- ``functional_dw``: an ``nn.Conv2d`` subclass whose forward calls ``F.conv2d(...,
  groups=self.groups)`` (HF EfficientNet's depthwise conv).
- ``std_conv``: weight-standardised convs (timm ``StdConv2d``: ``F.batch_norm`` over the weight).
- ``data_branch``: a submodule with a data-dependent branch (stays a frozen leaf).
- ``groupnorm_stream``: Hugging Face MobileViTV2's transformer layers: ``GroupNorm(1, C)``
  (a layer norm over C, H, W) between the residual stream and the convs that read it, beside
  a channel-wise ``GroupNorm(C, C)``; only the latter may sit in a site group's chain.
- ``groupnorm_heads``: GroupNorm with several channels per group, as module (FPN and
  RetinaNet heads) and as timm's ``GroupNormAct`` / HF BiT write it (``F.group_norm`` on
  the module's parameters): exact, the same count dropped in every group.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, Head, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, Head, finish, seeded


# ----------------------------------------------------------------------------- yolo
class Conv(nn.Module):
    """Conv2d -> BatchNorm2d -> SiLU (ultralytics ``Conv``)."""

    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    def __init__(self, c1=4):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats, strides, offset=0.5):
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


class Detect(nn.Module):
    """ultralytics' Detect in inference: anchors from the feature shapes, cached on self."""

    def __init__(self, nc, ch, reg_max=4):
        super().__init__()
        self.nc, self.reg_max, self.nl = nc, reg_max, len(ch)
        self.no = nc + 4 * reg_max
        self.register_buffer("stride", torch.tensor([8.0, 16.0, 32.0]))
        c2, c3 = max(8, ch[0] // 4), max(ch[0], nc)
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)
        self.dynamic, self.shape = False, None
        self.anchors, self.strides = torch.empty(0), torch.empty(0)

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape  # BCHW
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (a.transpose(0, 1) for a in make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        anchors = self.anchors.unsqueeze(0)
        x1y1, x2y2 = anchors - lt, anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class TinyYOLO(nn.Module):
    """Backbone (P3, P4, P5 + SPPF), a PAN neck of C2f blocks, a Detect head."""

    def __init__(self, nc=3):
        super().__init__()
        self.b3 = nn.Sequential(Conv(3, 8, 3, 2), Conv(8, 16, 3, 2), C2f(16, 16, 1, True), Conv(16, 16, 3, 2),
                                C2f(16, 16, 1, True))
        self.b4 = nn.Sequential(Conv(16, 24, 3, 2), C2f(24, 24, 1, True))
        self.b5 = nn.Sequential(Conv(24, 32, 3, 2), C2f(32, 32, 1, True), SPPF(32, 32))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n4, self.n3 = C2f(32 + 24, 24), C2f(24 + 16, 16)
        self.d3, self.o4 = Conv(16, 16, 3, 2), C2f(16 + 24, 24)
        self.d4, self.o5 = Conv(24, 24, 3, 2), C2f(24 + 32, 32)
        self.detect = Detect(nc, (16, 24, 32))

    def forward(self, x, *args, **kwargs):
        return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False, visualize=False, augment=False, embed=None):
        if augment or embed is not None:
            raise NotImplementedError("augmented inference")
        p3 = self.b3(x)
        p4 = self.b4(p3)
        p5 = self.b5(p4)
        n4 = self.n4(torch.cat([self.up(p5), p4], 1))
        o3 = self.n3(torch.cat([self.up(n4), p3], 1))
        o4 = self.o4(torch.cat([self.d3(o3), n4], 1))
        o5 = self.o5(torch.cat([self.d4(o4), p5], 1))
        return self.detect([o3, o4, o5])


def yolo():
    seeded()
    return finish(TinyYOLO(), (BATCH, 3, 64, 64))


# ----------------------------------------------------------------------------- tf_same
def tf_same_pad(x, conv: nn.Conv2d):
    """Hugging Face MobileNetV2's ``apply_tf_padding`` (sizes read in Python)."""
    in_height, in_width = x.shape[-2:]
    stride_height, stride_width = conv.stride
    kernel_height, kernel_width = conv.kernel_size
    if in_height % stride_height == 0:
        pad_h = max(kernel_height - stride_height, 0)
    else:
        pad_h = max(kernel_height - (in_height % stride_height), 0)
    # timm's get_same_padding form for the width
    pad_w = max((math.ceil(in_width / stride_width) - 1) * stride_width + kernel_width - in_width, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), "constant", 0.0)


class TFConv(nn.Module):
    def __init__(self, c1, c2, k, s, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x):
        return F.relu6(self.bn(self.conv(tf_same_pad(x, self.conv))))


class TFSameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = TFConv(3, 16, 3, 2)
        self.blocks = nn.Sequential(TFConv(16, 32, 1, 1), TFConv(32, 32, 3, 2, groups=32), TFConv(32, 24, 1, 1),
                                    TFConv(24, 48, 1, 1), TFConv(48, 48, 5, 2, groups=48), TFConv(48, 32, 1, 1))
        self.head = Head(32)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def tf_same():
    seeded()
    return finish(TFSameNet(), (BATCH, 3, 30, 30))


# ----------------------------------------------------------------------------- size_check
class SizeCheckNet(nn.Module):
    """smp's FPN/DeepLabV3+ root: the input size is checked in Python before the encoder."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = Conv(3, 16, 3, 2), Conv(16, 24, 3, 2)
        self.lat = nn.Conv2d(24, 16, 1)
        self.dec = Conv(16, 16, 3)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 32 != 0 or w % 32 != 0:
            raise RuntimeError(f"input size {h}x{w} is not divisible by 32")
        f1 = self.enc1(x)
        f2 = F.interpolate(self.lat(self.enc2(f1)), size=f1.shape[-2:], mode="nearest")
        return F.interpolate(self.out(self.dec(f1 + f2)), scale_factor=2.0, mode="bilinear")


def size_check():
    seeded()
    return finish(SizeCheckNet(), (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- functional_dw
class FunctionalConv2d(nn.Conv2d):
    """HF EfficientNet's depthwise conv: an nn.Conv2d subclass with a functional forward."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalDWNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.expand = FunctionalConv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = FunctionalConv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.grouped = FunctionalConv2d(32, 16, 3, padding=1, groups=4)
        self.head = Head(16)

    def forward(self, x):
        x = F.silu(self.bn1(self.expand(self.stem(x))))
        x = F.silu(self.bn2(self.dw(x)))
        return self.head(self.grouped(x))


def functional_dw():
    seeded()
    return finish(FunctionalDWNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- std_conv
class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardised over its fan-in by F.batch_norm."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NFNets): standardised, then scaled by a learned per-output gain."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = StdConv2d(3, 16, 3, padding=1)
        self.c2 = ScaledStdConv2d(16, 24, 3, padding=1, stride=2)
        self.c3 = StdConv2d(24, 16, 1)
        self.plain = nn.Conv2d(16, 16, 1)  # a plain conv: its own outputs stay prunable
        self.head = Head(16)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.head(F.relu(self.plain(x)))


def std_conv():
    seeded()
    return finish(StdConvNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- data_branch
class DataGate(nn.Module):
    """Takes a branch on tensor contents: never specialised, a frozen leaf."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 0.5:  # DATA-DEPENDENT LINE
            return self.proj(x)
        return x * 0.5


class DataBranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Conv(3, 16, 3)
        self.gate = DataGate(16)
        self.b = Conv(16, 24, 3, 2)
        self.c = Conv(24, 16, 1)
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.c(self.b(self.gate(self.a(x)))))


def data_branch():
    seeded()
    return finish(DataBranchNet(), (BATCH, 3, 16, 16))


class GroupNormLayer(nn.Module):
    """x + conv2(act(conv1(norm(x)))), as MobileViTV2's FFN reads its stream."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(self.norm(x))))


class GroupNormStreamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv(3, 16, 3)
        self.layers = nn.Sequential(GroupNormLayer(16, 1), GroupNormLayer(16, 1), GroupNormLayer(16, 16))
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def groupnorm_stream():
    seeded()
    return finish(GroupNormStreamNet(), (BATCH, 3, 16, 16))


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct / HF BitGroupNormActivation: its own forward, functional norm."""

    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class GroupNormHeadsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), GroupNormAct(4, 16))
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.GroupNorm(3, 24), nn.ReLU(),
                                  nn.Conv2d(24, 24, 3, padding=1), GroupNormAct(24, 24))
        self.tower = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.ReLU())
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.tower(self.body(self.stem(x))))


def groupnorm_heads():
    seeded()
    return finish(GroupNormHeadsNet(), (BATCH, 3, 16, 16))


ZOO_ECOSYSTEM = {"eco_yolo": yolo, "eco_tf_same": tf_same, "eco_size_check": size_check,
                 "eco_functional_dw": functional_dw, "eco_std_conv": std_conv, "eco_data_branch": data_branch,
                 "eco_groupnorm_stream": groupnorm_stream, "eco_groupnorm_heads": groupnorm_heads}

#: plain torch.fx fails on these (TraceError); the specialising capture traces them
PLAIN_FX_FAILS = frozenset({"eco_yolo", "eco_tf_same", "eco_size_check", "eco_data_branch"})
