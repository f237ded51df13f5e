"""Analytic shape rules for the hottest ops, so capture skips the meta kernel dispatch.

Each rule returns a meta tensor of the op's output shape, or None to fall back to
running the op on meta tensors (any case it does not recognise). The result is the
same as the meta kernel's; it is only faster.

Example::

    out = fast_module_shape(nn.Conv2d(3, 8, 3, stride=2), (torch.empty(1, 3, 32, 32, device="meta"),))
    out.shape  # torch.Size([1, 8, 15, 15])
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

SAME_SHAPE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.LeakyReLU, nn.ELU, nn.Mish,
)
SAME_SHAPE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, torch.sigmoid, F.sigmoid)


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device="meta")


def _conv(m, x):
    nd = m.weight.dim() - 2
    if x.dim() != nd + 2 or isinstance(m.padding, str) or isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None
    spatial = [(x.shape[2 + i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
               for i in range(nd)]
    return _empty((x.shape[0], m.out_channels, *spatial), x)


def _pool(m, x):
    if getattr(m, "ceil_mode", True) or getattr(m, "return_indices", False) or x.dim() != 4:
        return None
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    d = pair(getattr(m, "dilation", 1))
    spatial = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    return _empty((*x.shape[:2], *spatial), x)


def _adaptive(m, x):
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * (x.dim() - 2)
    if None in size or len(size) != x.dim() - 2:
        return None
    return _empty((*x.shape[:2], *size), x)


def fast_module_shape(m: nn.Module, args: tuple, kwargs: dict | None = None):
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    cls = type(m)
    if cls in SAME_SHAPE_MODULES:
        return _empty(x.shape, x)
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return _conv(m, x) if x.dtype == m.weight.dtype else None
    if cls is nn.Linear and x.dtype == m.weight.dtype and x.shape[-1] == m.in_features:
        return _empty((*x.shape[:-1], m.out_features), x)
    if cls in (nn.MaxPool2d, nn.AvgPool2d):
        return _pool(m, x)
    if cls is nn.AdaptiveAvgPool2d:
        return _adaptive(m, x)
    return None


def fast_function_shape(target, args: tuple, kwargs: dict):
    if target in SAME_SHAPE_FUNCTIONS and len(args) == 1 and isinstance(args[0], torch.Tensor) \
            and set(kwargs) <= {"inplace"}:
        return _empty(args[0].shape, args[0])
    if target in (operator.add, operator.iadd, operator.mul) and not kwargs and len(args) == 2:
        a, b = args
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype:
            try:
                return _empty(torch.broadcast_shapes(a.shape, b.shape), a)
            except RuntimeError:
                return None
    return None
