"""Classic CNNs for the zoo: VGG, ResNet family, DenseNet, Inception, 1d/3d nets.

Each builder returns (model_in_eval_mode, example_inputs). The ResNet, MobileNet and
DenseNet classes are parametrised so the full-size benchmark models reuse them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, Head, conv_bn_relu, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, Head, conv_bn_relu, finish, seeded


# ----------------------------------------------------------------------------- VGG
class VGG(nn.Module):
    """conv-bn-relu chain + maxpool; flatten of a C x 4 x 4 map repeats each channel 16x
    into the first Linear; Linear -> ReLU -> Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 8), conv_bn_relu(8, 8), nn.MaxPool2d(2),
            conv_bn_relu(8, 16), conv_bn_relu(16, 16), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg():
    seeded()
    return finish(VGG(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """torchvision BasicBlock: one `self.relu` used twice; residual add couples the
    block output with its input (or the 1x1 conv+BN projection)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (expansion 4, stride on the 3x3): `self.relu` is called on
    tensors of two different widths; `groups` > 1 gives the ResNeXt block."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision layout: 7x7/2 stem + maxpool, stages, avgpool, torch.flatten, fc."""

    def __init__(self, block, layers, widths, stem=64, num_classes=10, groups=1, base_width=64):
        super().__init__()
        self.inplanes = stem
        self.groups, self.base_width = groups, base_width
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(block, w, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_basic():
    seeded()
    return finish(ResNet(BasicBlock, [2, 2], [8, 16], stem=8), (BATCH, 3, 32, 32))


def resnet_bottleneck():
    seeded()
    return finish(ResNet(Bottleneck, [2, 2], [4, 8], stem=8), (BATCH, 3, 32, 32))


def resnext():
    """Bottleneck with a grouped 3x3 (groups=4): same kept count in every conv group."""
    seeded()
    model = ResNet(Bottleneck, [1, 2], [4, 8], stem=8, groups=4, base_width=64)
    return finish(model, (BATCH, 3, 32, 32))


# ----------------------------------------------------------------------------- CIFAR ResNet, option A
class PadShortcut(nn.Module):
    """Option-A shortcut: subsample and zero-pad the channel axis (constant atoms)."""

    def __init__(self, planes: int):
        super().__init__()
        self.p = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.p, self.p), "constant", 0)


class CifarBlock(nn.Module):
    """BasicBlock whose downsampling shortcut is a channel pad, not a conv."""

    def __init__(self, inp, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or inp != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-56 style (3 stages 8/16/32, n blocks each), option-A shortcuts."""

    def __init__(self, n=2, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        blocks, inp = [], 8
        for i, w in enumerate([8, 16, 32]):
            for j in range(n):
                blocks.append(CifarBlock(inp, w, 2 if (i > 0 and j == 0) else 1))
                inp = w
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet_cifar_a():
    seeded()
    return finish(CifarResNet(n=2), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- Pre-activation ResNet
class PreActBlock(nn.Module):
    """BN-ReLU-conv order: the residual stream never passes through a BN directly; each
    block's bn1 -> relu -> conv1 chain reads the stream (a site group)."""

    def __init__(self, inp, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or inp != planes:
            self.shortcut = nn.Conv2d(inp, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(
            PreActBlock(8, 8), PreActBlock(8, 8), PreActBlock(8, 16, 2), PreActBlock(16, 16))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet():
    seeded()
    return finish(PreActResNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3; output cat'ed onto the input (`torch.cat`)."""

    def __init__(self, inp, growth, bn_size=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        new = self.conv1(F.relu(self.norm1(x)))
        new = self.conv2(F.relu(self.norm2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    def __init__(self, inp, out):
        super().__init__(nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
                         nn.Conv2d(inp, out, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """Dense blocks + transitions, final BN-ReLU-pool-linear; every layer's norm1 reads a
    slice-wise growing concatenation (DenseNet site groups)."""

    def __init__(self, growth, blocks, init, bn_size=4, num_classes=10, big_stem=False):
        super().__init__()
        if big_stem:
            stem = [nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(3, init, 3, 1, 1, bias=False)]
        feats, c = stem, init
        for i, n in enumerate(blocks):
            for _ in range(n):
                feats.append(DenseLayer(c, growth, bn_size))
                c += growth
            if i != len(blocks) - 1:
                feats.append(Transition(c, c // 2))
                c //= 2
        feats.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet():
    seeded()
    return finish(DenseNet(growth=4, blocks=(3, 2), init=8), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- Inception
class Inception(nn.Module):
    """Four branches (1x1; 1x1->3x3; 1x1->5x5; maxpool->1x1) concatenated on dim 1."""

    def __init__(self, c):
        super().__init__()
        self.b1 = conv_bn_relu(c, 4, 1)
        self.b2 = nn.Sequential(conv_bn_relu(c, 4, 1), conv_bn_relu(4, 6, 3))
        self.b3 = nn.Sequential(conv_bn_relu(c, 2, 1), conv_bn_relu(2, 4, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(c, 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.mixed = Inception(8)
        self.conv = conv_bn_relu(18, 16)
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.conv(self.mixed(self.stem(x))))


def inception():
    seeded()
    return finish(InceptionNet(), (BATCH, 3, 16, 16))


# ----------------------------------------------------------------------------- 1d / 3d
class Conv1dNet(nn.Module):
    """Conv1d/BatchNorm1d with a residual block, AdaptiveAvgPool1d, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8))
        self.down = nn.Sequential(nn.Conv1d(8, 16, 3, 2, 1), nn.BatchNorm1d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c2(self.c1(x)))
        x = self.pool(self.down(x))
        return self.fc(torch.flatten(x, 1))


def conv1d():
    seeded()
    return finish(Conv1dNet(), (BATCH, 4, 32))


class Conv3dNet(nn.Module):
    """Conv3d/BatchNorm3d with a residual block and MaxPool3d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(8, 8, 1, bias=False), nn.BatchNorm3d(8))
        self.pool = nn.MaxPool3d(2)
        self.conv = nn.Sequential(nn.Conv3d(8, 12, 3, padding=1), nn.BatchNorm3d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.c2(self.c1(x)) + x)
        x = self.conv(self.pool(x))
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


def conv3d():
    seeded()
    return finish(Conv3dNet(), (BATCH, 3, 8, 8, 8))


ZOO_CNN = {
    "vgg": vgg,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "resnet_cifar_a": resnet_cifar_a,
    "preact_resnet": preact_resnet,
    "resnext": resnext,
    "densenet": densenet,
    "inception": inception,
    "conv1d": conv1d,
    "conv3d": conv3d,
}
