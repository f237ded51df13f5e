"""Mobile-style nets for the zoo: MobileNetV2/V3, EfficientNet, ShuffleNetV2.

Couplings: depthwise convs (incl. a channel multiplier of 2), SE gates (module and
functional spellings), chunk + cat + channel shuffle by view/transpose or nn.ChannelShuffle.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, channel_shuffle, conv_bn_relu, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, channel_shuffle, conv_bn_relu, finish, seeded


# ----------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection; residual when stride 1 and
    same width. With dw_mult, the expand conv is dropped and the depthwise conv itself
    expands (groups=C, out=t*C: each input channel feeds t output channels)."""

    def __init__(self, inp, oup, stride, t, dw_mult=False):
        super().__init__()
        hidden = int(round(inp * t))
        self.use_res = stride == 1 and inp == oup
        layers = []
        if dw_mult:
            layers.append(conv_bn_relu(inp, hidden, 3, stride, groups=inp, act=nn.ReLU6))
        else:
            if t != 1:
                layers.append(conv_bn_relu(inp, hidden, 1, act=nn.ReLU6))
            layers.append(conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers += [nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision layout; `settings` rows are (t, c, n, s); `dw_mult_after_stem` adds one
    residual block whose depthwise conv has channel multiplier 2."""

    def __init__(self, settings, stem=32, last=1280, num_classes=1000, dw_mult_after_stem=False):
        super().__init__()
        feats = [conv_bn_relu(3, stem, 3, 2, act=nn.ReLU6)]
        c = stem
        if dw_mult_after_stem:
            feats.append(InvertedResidual(c, c, 1, 2, dw_mult=True))
        for t, oc, n, s in settings:
            for i in range(n):
                feats.append(InvertedResidual(c, oc, s if i == 0 else 1, t))
                c = oc
        feats.append(conv_bn_relu(c, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


MOBILENETV2_FULL = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def mobilenetv2():
    seeded()
    settings = [[1, 8, 1, 1], [2, 12, 2, 2], [2, 16, 2, 1]]
    model = MobileNetV2(settings, stem=8, last=32, num_classes=10, dw_mult_after_stem=True)
    return finish(model, (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- MobileNetV3
class SqueezeExcitation(nn.Module):
    """AdaptiveAvgPool -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid; (N,C,1,1) gate."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class V3Block(nn.Module):
    def __init__(self, inp, exp, out, k, se, act, stride):
        super().__init__()
        self.use_res = stride == 1 and inp == out
        layers = []
        if exp != inp:
            layers.append(conv_bn_relu(inp, exp, 1, act=act))
        layers.append(conv_bn_relu(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, exp // 4))
        layers += [nn.Conv2d(exp, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        if self.use_res:
            out = out + x
        return out


class MobileNetV3(nn.Module):
    """Hardswish/ReLU blocks with SE; Linear -> Hardswish -> Dropout -> Linear head."""

    def __init__(self):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        cfg = [(8, 16, 8, 3, True, re, 1), (8, 24, 12, 3, False, re, 2),
               (12, 32, 12, 5, True, hs, 1), (12, 32, 16, 5, True, hs, 2)]
        self.features = nn.Sequential(conv_bn_relu(3, 8, 3, 2, act=hs), *(V3Block(*c) for c in cfg),
                                      conv_bn_relu(16, 32, 1, act=hs))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(24, 10))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3():
    seeded()
    return finish(MobileNetV3(), (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- EfficientNet
class MBConv(nn.Module):
    """MBConv with SiLU and a functional SE (`x * torch.sigmoid(s)`), residual."""

    def __init__(self, inp, out, t, k, stride):
        super().__init__()
        hidden = inp * t
        self.use_res = stride == 1 and inp == out
        self.expand = conv_bn_relu(inp, hidden, 1, act=nn.SiLU) if t != 1 else nn.Identity()
        self.dw = conv_bn_relu(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU)
        self.se_reduce = nn.Conv2d(hidden, max(1, inp // 4), 1)
        self.se_expand = nn.Conv2d(max(1, inp // 4), hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, inputs):
        x = self.dw(self.expand(inputs))
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.se_expand(F.silu(self.se_reduce(s)))
        x = x * torch.sigmoid(s)
        x = self.project(x)
        if self.use_res:
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(8, 8, 1, 3, 1), MBConv(8, 12, 4, 3, 2),
                                    MBConv(12, 12, 2, 5, 1))
        self.head = conv_bn_relu(12, 32, 1, act=nn.SiLU)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.dropout(x))


def efficientnet():
    seeded()
    return finish(EfficientNet(), (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- ShuffleNetV2
class ShuffleUnit(nn.Module):
    """Stride 1: chunk(2) -> (x1, branch2(x2)) cat -> shuffle. Stride 2: two branches on
    the whole input, cat, shuffle. Shuffle by view/transpose, or nn.ChannelShuffle(2)."""

    def __init__(self, inp, oup, stride, shuffle_module=False):
        super().__init__()
        self.stride = stride
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                conv_bn_relu(inp, bf, 1))
        self.branch2 = nn.Sequential(
            conv_bn_relu(inp if stride > 1 else bf, bf, 1),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False), nn.BatchNorm2d(bf),
            conv_bn_relu(bf, bf, 1))
        self.shuffle = nn.ChannelShuffle(2) if shuffle_module else None

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        if self.shuffle is not None:
            return self.shuffle(out)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, shuffle_module=False):
        super().__init__()
        sm = shuffle_module
        self.conv1 = conv_bn_relu(3, 8, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2, sm), ShuffleUnit(16, 16, 1, sm))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 32, 2, sm), ShuffleUnit(32, 32, 1, sm))
        self.conv5 = conv_bn_relu(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage3(self.stage2(x)))
        return self.fc(x.mean([2, 3]))


def shufflenetv2():
    seeded()
    return finish(ShuffleNetV2(), (BATCH, 3, 32, 32))


def shufflenet_module():
    """ShuffleNetV2 with nn.ChannelShuffle(2) modules instead of view/transpose."""
    seeded()
    return finish(ShuffleNetV2(shuffle_module=True), (BATCH, 3, 32, 32))


ZOO_MOBILE = {
    "mobilenetv2": mobilenetv2,
    "mobilenetv3": mobilenetv3,
    "efficientnet": efficientnet,
    "shufflenetv2": shufflenetv2,
    "shufflenet_module": shufflenet_module,
}
