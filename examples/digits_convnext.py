"""A BN-free ConvNeXt-style network for the digits data (examples/digits.py's loaders).

Patchify stem (2x2 conv, stride 2) and LayerNorm, two stages of ConvNeXt blocks (32 and 64
channels) with a LayerNorm + 2x2 strided conv between them, global mean, LayerNorm, Linear.
A block is the ConvNeXt one without layer scale: 7x7 depthwise conv, LayerNorm over
channels (channels-last), Linear(C, 4C) - GELU - Linear(4C, C), residual add. No BN
anywhere, so SCP gives its prunable groups (the MLP hidden channels) learned gates.

    python examples/digits_convnext.py --epochs 30     # train unpruned, print val accuracy
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (permute, normalise, permute back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C), plus the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class DigitsConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, int] = (32, 64), depths: tuple[int, int] = (2, 2),
                 num_classes: int = digits.NUM_CLASSES, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, 2), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(*(Block(dims[0]) for _ in range(depths[0])))
        self.down = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(*(Block(dims[1]) for _ in range(depths[1])))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((-2, -1))))


def build(dims: tuple[int, int] = (32, 64), depths: tuple[int, int] = (2, 2)) -> nn.Module:
    """The untrained network (16x16 single-channel inputs, 10 classes)."""
    return DigitsConvNeXt(dims, depths)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train the unpruned digits ConvNeXt-style net.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(digits.SEED)
    train_loader, val_loader = digits.loaders()
    model = build()
    start = time.perf_counter()
    digits.train(model, train_loader, epochs=args.epochs, lr=args.lr)
    print(f"epochs {args.epochs}  val accuracy {digits.evaluate(model, val_loader):.4f}  "
          f"train {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
