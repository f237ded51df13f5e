"""Ops that reduce or resample axes: pooling, upsampling and spatial pads (channels pass
through), and reductions (sum, mean, max, min, p-norms and ``F.normalize`` over channels
made exact mask sites).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atoms import NONE, along, carrying_axes, known_grid, on_axis
from ..registry import annotate, register
from .elementwise import broadcast_rule
from .tensors import empty, one_tensor

# ----------------------------------------------------------------------------- spatial ops

SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool2d, F.interpolate, torch.max_pool2d, torch.avg_pool1d,
)
# F.upsample* call F.interpolate without a torch-function check: fx records interpolate.


def spatial_rule(ctx, node):
    """Ops that act on each channel's spatial map (NC... layout): channels pass through."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    if lay is None:
        return ctx.unknown()
    if v.dim() < 3 or any(lay.shape[d] > 1 for d in range(2, lay.ndim)):
        return ctx.unknown(f"{ctx.where()}: channels not on axis 1")
    out = ctx.out()
    if isinstance(out, (tuple, list)):  # max pooling with indices
        return type(out)(lay for _ in out)
    return lay


register(*SPATIAL_MODULES, *SPATIAL_FUNCTIONS, chain="pass")(spatial_rule)


@register(F.grid_sample, chain="pass")
def grid_sample_rule(ctx, node):
    """Each channel's map sampled at the grid's points (deformable attention, RT-DETR,
    spatial transformers): the input's channels pass through; the grid is read as
    coordinates, so the channels it carries are frozen."""
    grid = node.args[1] if len(node.args) > 1 else node.kwargs["grid"]
    ctx.freeze(ctx.layout(grid), f"{ctx.where()}: read as sampling coordinates")
    return spatial_rule(ctx, node)


@register(F.unfold, nn.Unfold)
def unfold_rule(ctx, node):
    """im2col: (N, C, H, W) -> (N, C * kh * kw, L), each channel's kernel positions in a row,
    channel-major: a channel owns its kh * kw positions, which are pruned with it."""
    lay = spatial_rule(ctx, node)
    if not isinstance(lay, np.ndarray):
        return lay
    if lay.ndim != 4 or lay.shape[1] == 1:  # unbatched, or no channels to own positions
        return ctx.unknown()
    per = ctx.out().shape[1] // lay.shape[1]
    return np.repeat(lay.reshape(lay.shape[0], lay.shape[1], 1), per, axis=1)


@register("unfold")
def sliding_windows_rule(ctx, node):
    """``x.unfold(dim, size, step)``: windows along a non-channel axis, each a new last axis
    (ConvMixer-style patches, timm's ``Tensor.unfold``); along a channel axis: frozen."""
    lay = ctx.layout(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dimension"]
    if lay.shape[dim % lay.ndim] > 1:
        return ctx.unknown(f"{ctx.where()}: windows along the channel axis")
    return lay.reshape(*lay.shape, 1)


def pool_shape(m, args, kwargs):
    x = one_tensor(args, kwargs)
    if x is None or getattr(m, "ceil_mode", True) or getattr(m, "return_indices", False) or x.dim() != 4:
        return None
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    d = pair(getattr(m, "dilation", 1))
    spatial = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    return empty((*x.shape[:2], *spatial), x)


def adaptive_shape(m, args, kwargs):
    x = one_tensor(args, kwargs)
    if x is None:
        return None
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * (x.dim() - 2)
    if None in size or len(size) != x.dim() - 2:
        return None
    return empty((*x.shape[:2], *size), x)


annotate(nn.MaxPool2d, nn.AvgPool2d, shape=pool_shape)
annotate(nn.AdaptiveAvgPool2d, shape=adaptive_shape)

# ----------------------------------------------------------------------------- reductions


def reduce_surgery(sctx, node):
    """mean over channels becomes mean * k / C0 (the dropped channels count as zeros)."""
    site = sctx.site_of(node)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if site is None or name != "mean":
        return
    keep = sctx.site_keep(site)
    if keep.all():
        return
    g = sctx.graph
    with g.inserting_after(node):
        scaled = g.call_function(operator.mul, (node, float(keep.sum()) / len(keep)))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)


def _reads_values(user) -> bool:
    """``torch.max(x, 1)[0]`` or ``.values``: the values, not the arg-max index."""
    return (user.target is operator.getitem and user.args[1] == 0) or (
        user.target is getattr and user.args[1] == "values")


EXACT_FILL = {"sum": 0.0, "nansum": 0.0, "mean": 0.0, "amax": float("-inf"), "max": float("-inf"),
              "amin": float("inf"), "min": float("inf")}
REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp",
              "nansum", "nanmean")
# p-norms read (x, p, dim, keepdim): ``x.norm(2, (1, 2))``, ``torch.norm``, ``torch.linalg.vector_norm``
# (ConvNeXtV2's global response norm over the spatial axes)
NORMS = ("norm", torch.norm, torch.linalg.vector_norm)


def reduce_rule(ctx, node):
    """Reductions over spatial axes pass channels through; over the channel axis, sum,
    mean, max and min become exact mask sites, the others are inexact."""
    x = node.args[0] if node.args else node.kwargs["input"]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if node.target in NORMS:
        p = ctx.arg(1, "ord" if node.target is torch.linalg.vector_norm else "p", 2)
        dims, keepdim = ctx.arg(2, "dim", None), bool(ctx.arg(3, "keepdim", False))
        name = "norm"
        exact = p is None or p == "fro" or (isinstance(p, (int, float)) and p > 0)
    else:
        dims = ctx.arg(1, "dim", None)
        if len(node.args) > 1 and isinstance(ctx.val(node.args[1]), torch.Tensor):
            return broadcast_rule(ctx, node)  # torch.max(a, b) is element-wise
        keepdim = bool(ctx.arg(2, "keepdim", False))
        exact = name in EXACT_FILL
    nd = v.dim()
    dims = list(range(nd)) if dims is None or dims == [] else [d % nd for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    crossing = [d for d in dims if lay.shape[d] > 1]
    if crossing:
        axes = carrying_axes(lay)
        if exact and len(axes) == 1:  # zeros add nothing to a p-norm with p > 0, as to a sum
            ctx.site(0, along(lay, axes[0], v.shape[axes[0]]), axes[0], "reduce", EXACT_FILL.get(name, 0.0))
            if isinstance(out, tuple) and not all(_reads_values(u) for u in node.users):
                ctx.freeze(lay, f"{ctx.where()}: uses the arg-max index over channels")
        else:
            ctx.inexact(lay, f"{name} over channels")
    red = lay.copy()
    for d in dims:
        red = red.take([0], axis=d)
        if d in crossing:
            red = np.full_like(red, NONE)
    if not keepdim:
        red = red.reshape([s for k, s in enumerate(red.shape) if k not in dims])
    return tuple(red for _ in out) if isinstance(out, tuple) else red


register(*REDUCTIONS, *(getattr(torch, n) for n in REDUCTIONS), *NORMS, surgery=reduce_surgery)(reduce_rule)


@register(F.normalize)
def normalize_rule(ctx, node):
    """``F.normalize(x, p, dim)``: ``x`` over its p-norm along ``dim``. Along an axis without
    channels the layout passes through; along the channel axis, for p > 0, dropped channels
    (zeros) add nothing to the norm, so it is an exact mask site (Swin V2's cosine attention,
    CLIP-style embeddings)."""
    x = node.args[0] if node.args else node.kwargs["input"]
    lay, v = ctx.layout(x), ctx.val(x)
    p, dim = ctx.arg(1, "p", 2.0), ctx.arg(2, "dim", 1) % v.dim()
    if lay.shape[dim] == 1:
        return lay
    axes = carrying_axes(lay)
    if not (isinstance(p, (int, float)) and p > 0) or (len(axes) > 1 and not known_grid(lay)):
        ctx.inexact(lay, f"a p-norm with p = {p} over channels")
        return lay
    if len(axes) > 1:  # (heads x dim), as Swin V2 normalizes q and k: the same dims in every head
        lay = on_axis(ctx.unify_columns(lay, dim, v.shape[dim]), dim, v.dim())
    ctx.site(0, along(lay, dim, v.shape[dim]), dim, "reduce", 0.0)
    return lay
