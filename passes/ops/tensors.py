"""Small helpers every op family uses: replacing parameters in surgery, index vectors,
and the meta tensors that fast shape rules return."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _own(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` detached, contiguous and in storage of its own: copied only when it is a view
    of ``old`` (a slice that kept everything) or not contiguous; a gather is fresh already."""
    new = new.detach()
    if not new.is_contiguous() or (old is not None and new.untyped_storage().data_ptr()
                                   == old.untyped_storage().data_ptr()):
        new = new.clone(memory_format=torch.contiguous_format)
    return new


def _param(old: torch.Tensor | None, new: torch.Tensor | None):
    if old is None:
        return None
    new = _own(old, new)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def take(t: torch.Tensor, dim: int, keep: np.ndarray) -> torch.Tensor:
    """The kept entries of ``t`` along ``dim`` (``index_select``: a contiguous gather, 3-10x
    faster than advanced indexing on a weight's input axis); ``t`` itself if all are kept."""
    if keep.all():
        return t
    return t.index_select(dim, idx(keep))


def idx(mask: np.ndarray) -> torch.Tensor:
    """Positions of the True entries of a keep mask, as a long tensor."""
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind."""
    old = getattr(module, name)
    if name in module._parameters:
        module._parameters[name] = _param(old, value)
    else:
        module._buffers[name] = _own(old, value)


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``shape`` with ``like``'s dtype: what fast shape rules return."""
    return torch.empty(shape, dtype=like.dtype, device="meta")


def one_tensor(args: tuple, kwargs: dict | None) -> torch.Tensor | None:
    """The single tensor argument of a module call with no keywords, else None."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    return args[0]


def same_shape_module(m, args, kwargs):
    """Fast shape of a module that keeps its input's shape (activations, BN)."""
    x = one_tensor(args, kwargs)
    return empty(x.shape, x) if x is not None else None


def same_shape_function(target, args, kwargs):
    """Fast shape of a per-element function called as ``f(x)`` or ``f(x, inplace=...)``."""
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and set(kwargs) <= {"inplace"}:
        return empty(args[0].shape, args[0])
    return None
