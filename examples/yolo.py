"""Ultralytics YOLOv8n as shipped, pruned by the specialising capture (issue 9).

``DetectionModel("yolov8n.yaml")`` is built from its config (no weights downloaded) and
wrapped so that the output is one tensor (the decoded boxes and class scores, the first
element of Detect's inference output). Its ``forward(x, *args, **kwargs)``, the C2f blocks'
``list(self.cv1(x).chunk(2, 1))`` and Detect's anchors cached under
``if self.dynamic or self.shape != shape`` are traced as written. Needs ultralytics (the
``ultralytics`` extra); set ``YOLO_CFG`` for another config (``yolo11n.yaml``, ``yolov8s.yaml``).

    softprune-fx deps examples/yolo.py:build
    softprune-fx prune examples/yolo.py:build --ratio 0.4

As a model spec: ``build()``, ``example_inputs()``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

SIZE = 320


class FirstOutput(nn.Module):
    """The first tensor of a model whose inference output is ``(y, features)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        return y[0] if isinstance(y, (tuple, list)) else y


def build(cfg: str | None = None) -> nn.Module:
    """YOLOv8n (or ``cfg``) from its yaml, random weights, eval mode."""
    from ultralytics.nn.tasks import DetectionModel  # optional dependency
    torch.manual_seed(0)
    model = DetectionModel(cfg or os.environ.get("YOLO_CFG", "yolov8n.yaml"), verbose=False)
    return FirstOutput(model).eval()


def example_inputs() -> tuple:
    """One 320x320 RGB image."""
    return (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),)
