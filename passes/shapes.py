"""Analytic shape rules for the hottest ops, so capture skips the meta kernel dispatch.

The rules live in the op registry (each entry's ``shape``); these two functions find the
entry for exactly the module class or function called (a subclass may compute something
else) and return a meta tensor of the op's output shape, or None to fall back to running
the op on meta tensors. The result is the same as the meta kernel's; it is only faster.

Example::

    out = fast_module_shape(nn.Conv2d(3, 8, 3, stride=2), (torch.empty(1, 3, 32, 32, device="meta"),))
    out.shape  # torch.Size([1, 8, 15, 15])
"""
from __future__ import annotations

from . import ops  # noqa: F401  (fills the registry)
from .registry import exact_entry


def fast_module_shape(m, args: tuple, kwargs: dict | None = None):
    entry = exact_entry(type(m))
    return entry.shape(m, args, kwargs) if entry is not None and entry.shape is not None else None


def fast_function_shape(target, args: tuple, kwargs: dict):
    entry = exact_entry(target)
    return entry.shape(target, args, kwargs) if entry is not None and entry.shape is not None else None
