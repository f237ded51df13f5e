"""A small real-data example: scikit-learn's bundled 8x8 digits on a tiny post-activation ResNet.

load_digits() (1797 images, 10 classes) is upsampled once to 16x16 (bilinear) and
normalised with the training mean and std; the split is a fixed stratified 80/20
(seed 0: 1437 train, 360 val). Needs scikit-learn (an optional extra).

    python examples/digits.py --epochs 30     # train the unpruned network, print val accuracy
    python examples/digits_scp.py             # SCP at a 40% FLOPs cut vs unpruned (table)

As a model spec: ``build()``, ``loaders()``, ``example_inputs()``.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

SEED = 0
SIZE = 16
NUM_CLASSES = 10


# --------------------------------------------------------------------------- model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "silu": nn.SiLU, "gelu": nn.GELU,
               "hardswish": nn.Hardswish, "mish": nn.Mish}


class BasicBlock(nn.Module):
    """torchvision's post-activation BasicBlock: conv-BN-act-conv-BN, add, act (ReLU by default)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = ACTIVATIONS[act]()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class DigitsResNet(nn.Module):
    """Stem conv3x3-BN-act (16), three stages of BasicBlocks 16/32/64 (stride 1/2/2), pool, fc.
    ``act``: "relu" (as torchvision), "silu", "gelu", "hardswish" or "mish" everywhere."""

    def __init__(self, layers: tuple[int, int, int] = (2, 2, 2), num_classes: int = NUM_CLASSES,
                 in_channels: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.inplanes, self.act = 16, act
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = ACTIVATIONS[act]()
        self.layer1 = self._make_layer(16, layers[0])
        self.layer2 = self._make_layer(32, layers[1], stride=2)
        self.layer3 = self._make_layer(64, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self.act)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, act=self.act) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def build(blocks: int = 2, act: str = "relu") -> nn.Module:
    """The example network (untrained): ``blocks`` BasicBlocks per stage (2: a ResNet-14),
    ``act`` after every BN that torchvision follows with a ReLU."""
    return DigitsResNet((blocks, blocks, blocks), act=act)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(1, 1, SIZE, SIZE),)


# --------------------------------------------------------------------------- data


def _tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("examples/digits.py needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=digits.target, random_state=SEED)
    idx_train, idx_val = torch.from_numpy(idx_train), torch.from_numpy(idx_val)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders; train is shuffled by a generator seeded with SEED."""
    x_train, y_train, x_val, y_val = _tensors()
    generator = torch.Generator().manual_seed(SEED)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                       generator=generator, num_workers=0)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=256, shuffle=False, num_workers=0)
    return train, val


# --------------------------------------------------------------------------- training


def param_groups(model: nn.Module, weight_decay: float = 1e-4) -> list[dict]:
    """SGD parameter groups: weight decay on everything except BN biases (SCP's beta)."""
    bn_bias = {id(m.bias) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in bn_bias], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in bn_bias], "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / total


def train(model: nn.Module, train_loader: DataLoader, epochs: int = 30, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 1e-4) -> nn.Module:
    """SGD with momentum and a per-step cosine schedule to 0."""
    opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train_loader))
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train the unpruned digits ResNet.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=2, help="BasicBlocks per stage")
    parser.add_argument("--threads", type=int, default=1)  # 2 threads crawl when the other core is busy
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    train_loader, val_loader = loaders(args.batch_size)
    model = build(args.blocks)
    start = time.perf_counter()
    train(model, train_loader, epochs=args.epochs, lr=args.lr)
    seconds = time.perf_counter() - start
    print(f"epochs {args.epochs}  val accuracy {evaluate(model, val_loader):.4f}  "
          f"train {seconds:.1f} s ({seconds / max(1, args.epochs):.2f} s/epoch)")


if __name__ == "__main__":
    main()
