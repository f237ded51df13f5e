"""Ops that move the channel axis or read its size: reshapes (view, flatten, unflatten,
squeeze), permutes, expand, cat/stack, pixel and channel shuffle, GLU, and the shape
queries (``x.shape``, ``size``, ``numel``) whose results follow pruning.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..atoms import NONE, UNKNOWN, along, carrying_axes, filled, fixed_extent, on_axis, reshape_layout
from ..flow_types import ChannelCount, Grid
from ..registry import register
from .sizes import (axis_sizes, concatenated_sizes, constant_size, joined_sizes, pure_count, reemit_concatenated,
                    reemit_whole_shape, reshape_sizes, whole_shape)

# ----------------------------------------------------------------------------- reshapes


def reshape_surgery(sctx, node):
    """Re-emit integer size constants of view/reshape/unflatten, and sizes that are pure
    channel counts, with the pruned extents (a pure count of pruned channels sizing an axis
    of other channels, or of none, must not follow its own)."""
    layout = sctx.layout(node)
    pruned = isinstance(layout, np.ndarray) and (layout >= 0).any()
    kind, first, sizes, packed = reshape_sizes(node, node.meta["val"].dim())
    whole = kind == "view" and len(sizes) == 1 and whole_shape(sizes[0])
    if not pruned and not whole and not any(pure_count(sctx, s, layout, None) for s in sizes):
        return
    extents = sctx.kept_extents(node) if pruned else list(node.meta["val"].shape)
    if node.op == "call_module":
        m = sctx.module(node)
        if isinstance(m, nn.Unflatten):
            dim = m.dim % len(extents)
            m.unflattened_size = tuple(extents[dim:dim + len(m.unflattened_size)])
        return
    if kind is None:
        return
    if kind == "view" and len(sizes) == 1 and concatenated_sizes(sizes[0]):
        reemit_concatenated(sctx, node, extents)
        return
    if whole:
        reemit_whole_shape(sctx, node, extents, layout)
        return
    new = [extents[first + i] if constant_size(s) not in (None, -1) or pure_count(sctx, s, layout, first + i)
           else s for i, s in enumerate(sizes)]
    if kind == "unflatten":
        node.args = (node.args[0], node.args[1], tuple(new))
    else:
        node.args = (node.args[0], tuple(new)) if packed or node.target is torch.reshape else (node.args[0], *new)


def reshape_rule(ctx, node):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: atoms follow the memory order; a
    channel axis split into several axes (a shuffle's view) must keep whole columns."""
    x = node.args[0] if node.args else node.kwargs["input"]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    new = reshape_layout(lay, tuple(v.shape), tuple(out.shape))
    if new is None:
        return ctx.unknown(f"{ctx.where()}: reshape not followed")
    sizes = axis_sizes(ctx, node, out.dim())
    direct = not joined_sizes(node, out.dim())
    for d, src in sizes.items():
        if isinstance(src, ChannelCount):
            _check_count(ctx, new, d, out.shape[d], src, direct)
    # the axis that shrinks (a Grid's columns run along the last carrying axis) must be sized
    # by a value that follows it: a run-time number read from elsewhere stays as traced
    for d in carrying_axes(new)[-1:]:
        if d in sizes and sizes[d] is None and (new >= 0).any():
            ctx.freeze(new, f"{ctx.where()}: axis {d} is sized by a run-time value that does not "
                            "follow its channels")
    if len(carrying_axes(new)) > 1 and (new >= 0).any():
        ctx.constrain(Grid(new.copy(), f"{ctx.where()}"))
        ctx.table.tag(new, "shuffle")
    return new


def _check_count(ctx, new: np.ndarray, d: int, extent: int, count: ChannelCount, direct: bool) -> None:
    """A size read from a channel axis follows that axis's pruned extent at run time, so the
    output axis it sizes must carry those channels. A pure count given directly (timm's
    ``C // heads`` sizing a head dim, not the stream) is a model constant: surgery writes the
    axis's pruned extent in its place, so nothing is coupled. Otherwise, where the axis
    carries other channels of the same extent they are pruned alike (unified); where it
    carries none the count must not change, and its channels are frozen."""
    carried = np.unique(new[new >= 0]) if new.shape[d] > 1 else np.zeros(0, np.int64)
    if (carried.size and np.isin(carried, count.atoms).all()) or (count.pure and direct):
        return
    vec = along(new, d, extent)
    if carried.size and vec is not None and len(vec) == len(count.atoms) and (vec >= 0).all():
        ctx.unify(vec, count.atoms.copy())
        return
    why = f"{ctx.where()}: a channel count sizes an axis that does not carry those channels"
    ctx.freeze(count.atoms, why)
    ctx.freeze(new, why)


register(torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten,
         "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
         surgery=reshape_surgery)(reshape_rule)


@register("permute", "transpose", "t", "movedim", "swapaxes", torch.permute, torch.transpose,
          torch.movedim, torch.swapaxes, torch.t)
def permute_rule(ctx, node):
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    nd = v.dim()
    if node.target in ("permute", torch.permute):
        perm = node.args[1:] if node.target == "permute" else node.args[1]
        perm = list(perm[0]) if len(perm) == 1 and isinstance(perm[0], (tuple, list)) else list(perm)
    elif node.target in ("t", torch.t):
        perm = list(range(nd))[::-1]
    else:
        a, b = (node.args[1], node.args[2]) if len(node.args) > 2 else (-2, -1)
        perm = list(range(nd))
        if node.target in ("movedim", torch.movedim):
            perm.insert(b % nd, perm.pop(a % nd))
        else:
            perm[a % nd], perm[b % nd] = perm[b % nd], perm[a % nd]
    return np.transpose(lay, [p % nd for p in perm])


@register("expand", "expand_as", torch.broadcast_to)
def expand_rule(ctx, node):
    """Expanding an axis of extent 1: to a size that follows the channels (``expand_as``,
    or a size read from a channel axis) the new axis carries those channels; to a
    constant size it is a fixed-size tensor (UNKNOWN)."""
    x = node.args[0]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    nd = out.dim()
    lay = lay.reshape((1,) * (nd - lay.ndim) + lay.shape)
    vshape = (1,) * (nd - v.dim()) + tuple(v.shape)
    grown = [d for d in range(nd) if vshape[d] == 1 and out.shape[d] > 1]
    if not grown:
        return lay
    if node.target != "expand_as":
        sizes = node.args[1:] if node.target == "expand" else (node.args[1],)
        sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)
        sizes = [None] * (nd - len(sizes)) + sizes
        if carrying_axes(lay) and all(sizes[d] == -1 for d in carrying_axes(lay)) and not any(
                isinstance(ctx.layout(sizes[d]), ChannelCount) for d in grown if isinstance(sizes[d], fx.Node)):
            return lay  # channel vectors copied along other axes (a ViT's class token over the batch)
    ctx.freeze(lay, f"{ctx.where()}: one channel expanded over many")
    if node.target == "expand_as":
        source = ctx.layout(node.args[1])
        follow = {d: along(source, d, out.shape[d]) for d in grown} if isinstance(source, np.ndarray) else {}
    else:
        follow = {}
        for d in grown:
            count = ctx.layout(sizes[d]) if isinstance(sizes[d], fx.Node) else None
            if isinstance(count, ChannelCount) and len(count.atoms) == out.shape[d]:
                follow[d] = count.atoms
    if any(follow.get(d) is None for d in grown):
        ctx.flow.unknown_why[node] = f"{ctx.where()}: expanded to a constant size"
        return filled(UNKNOWN, nd)
    new = np.where(lay == UNKNOWN, UNKNOWN, NONE)
    for d, atoms in follow.items():
        new = ctx.unify(new, on_axis(atoms, d, nd)) if (new >= 0).any() else spread_over(new, atoms, d, out)
    return new


@register("repeat")
def repeat_rule(ctx, node):
    """``x.repeat(*reps)``: a channel axis repeated r times carries its channels r times (a
    cat of r copies; the int stays right after pruning); an axis without channels grown by a
    size read from a channel axis carries those channels (a gather index spread over the
    stream: RT-DETR's and DETR's query selection), grown by a constant it carries none."""
    reps = node.args[1:]
    reps = list(reps[0]) if len(reps) == 1 and isinstance(reps[0], (tuple, list)) else list(reps)
    lay, out = ctx.layout(node.args[0]), ctx.out()
    nd = out.dim()
    new = lay.reshape((1,) * (nd - lay.ndim) + lay.shape)
    for d, r in enumerate(reps):
        count = ctx.layout(r) if isinstance(r, fx.Node) else None
        if new.shape[d] > 1:
            if isinstance(r, fx.Node):
                return ctx.unknown(f"{ctx.where()}: a channel axis repeated a run-time number of times")
            new = np.concatenate([new] * r, axis=d) if r != 1 else new
        elif isinstance(count, ChannelCount) and len(count.atoms) == out.shape[d] > 1:
            if (new >= 0).any():
                return ctx.unknown(f"{ctx.where()}: channels spread over a second axis")
            new = spread_over(new, count.atoms, d, out)
    return new


def spread_over(lay: np.ndarray, atoms: np.ndarray, d: int, out) -> np.ndarray:
    """``lay`` (no channels) copied along axis ``d`` of ``out`` as many times as ``atoms`` has
    channels: the axis carries them. An integer tensor (an index from argsort or topk, whose
    values the analysis does not follow: UNKNOWN) carries them too, since its copies are
    positions, never channels; a float one of unknown channels stays UNKNOWN."""
    spread = on_axis(atoms, d, lay.ndim)
    if out.is_floating_point() or out.is_complex():
        return np.where(lay == UNKNOWN, UNKNOWN, spread)
    return np.broadcast_to(spread, np.broadcast_shapes(lay.shape, spread.shape)).copy()


# ----------------------------------------------------------------------------- cat / stack


@register(torch.cat, torch.concat, torch.concatenate)
def cat_rule(ctx, node):
    """cat on the channel axis concatenates layouts; on another axis it unifies them."""
    items = ctx.sequence(node.args[0] if node.args else node.kwargs["tensors"])
    dim = ctx.arg(1, "dim", 0)
    out = ctx.out()
    nd = out.dim()
    dim %= nd
    if any(lay is None for lay, _ in items):
        return ctx.unknown()
    lays = [lay for lay, _ in items]
    if not any(lay.shape[dim] > 1 for lay in lays):  # along tokens or space (a ViT's class token)
        axes = {d for lay in lays for d in carrying_axes(lay)}
        fixed = [fixed_extent(lay, v.shape, axes) for lay, v in items]
        ctx.freeze([lay for lay, f in zip(lays, fixed) if f], f"{ctx.where()}: fixed size on a channel axis")
        return ctx.unify(*[filled(UNKNOWN, nd) if f else lay for lay, f in zip(lays, fixed)])
    if any(d != dim for lay in lays for d in carrying_axes(lay)):
        return ctx.unknown(f"{ctx.where()}: inputs carry channels on another axis")
    parts = [along(lay, dim, v.shape[dim]) for lay, v in items]
    atoms = np.concatenate(parts)
    ctx.table.tag(atoms, "concat")
    return on_axis(atoms, dim, nd)


@register(torch.stack)
def stack_rule(ctx, node):
    items = ctx.sequence(node.args[0])
    if any(lay is None for lay, _ in items):
        return ctx.unknown()
    dim = ctx.arg(1, "dim", 0) % ctx.out().dim()
    lay = ctx.unify(*[lay for lay, _ in items])
    return np.expand_dims(lay, dim)


# ----------------------------------------------------------------------------- shuffles


@register(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle_rule(ctx, node):
    """Each output channel takes r*r input channels: they form one class."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    r = ctx.module.upscale_factor if node.op == "call_module" else ctx.val(node.args[1])
    atoms = along(lay, 1, v.shape[1])
    if atoms is None:
        return ctx.unknown()
    blocks = atoms.reshape(-1, r * r)
    for row in blocks:
        ctx.unify(row[:1], row)
    ctx.table.tag(atoms, "shuffle")
    return on_axis(blocks[:, 0], 1, v.dim())


@register(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle_rule(ctx, node):
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    r = ctx.module.downscale_factor if node.op == "call_module" else ctx.val(node.args[1])
    atoms = along(lay, 1, v.shape[1])
    if atoms is None or any(lay.shape[d] > 1 for d in range(2, lay.ndim)):
        return ctx.unknown()
    ctx.table.tag(atoms, "shuffle")
    return on_axis(np.repeat(atoms, r * r), 1, v.dim())


@register(nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)
def channel_shuffle_rule(ctx, node):
    """A permutation that commutes with pruning when every group keeps the same columns."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    g = ctx.module.groups if node.op == "call_module" else ctx.val(node.args[1])
    atoms = along(lay, 1, v.shape[1])
    if atoms is None:
        return ctx.unknown()
    grid = atoms.reshape(g, -1)
    ctx.constrain(Grid(grid.copy(), ctx.where()))
    ctx.table.tag(atoms, "shuffle")
    return on_axis(grid.T.reshape(-1), 1, v.dim())


@register(nn.GLU, F.glu)
def glu_rule(ctx, node):
    """GLU is a split in halves and a multiply: the halves unify position by position."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    dim = ctx.module.dim if node.op == "call_module" else ctx.arg(1, "dim", -1)
    dim %= v.dim()
    if lay.shape[dim] == 1:
        return lay
    atoms = along(lay, dim, v.shape[dim])
    if atoms is None:
        return ctx.unknown()
    half = len(atoms) // 2
    return on_axis(ctx.unify(atoms[:half], atoms[half:]), dim, v.dim())


# ----------------------------------------------------------------------------- shape queries


@register(getattr)
def getattr_rule(ctx, node):
    """``x.shape`` and friends carry no channels; ``torch.max(x, 1).values`` picks a field."""
    lay = ctx.flow.layouts.get(node.args[0])
    if node.args[1] == "shape":
        return size_layout(ctx, node.args[0], None)
    if not isinstance(ctx.out(), torch.Tensor):
        return None
    if isinstance(lay, tuple) and node.args[1] in ("values", "indices"):
        return lay[0 if node.args[1] == "values" else 1]
    if node.args[1] in ("data", "real"):
        return ctx.layout(node.args[0])
    return ctx.unknown()


def size_layout(ctx, x, dim):
    """``x.size(dim)`` / ``x.shape``: the extents of channel axes are ChannelCounts."""
    lay, v = ctx.layout(x), ctx.val(x)
    if not isinstance(lay, np.ndarray):
        return None

    def count(d):
        if lay.shape[d] == 1 or not (lay >= 0).any():
            return None
        vec = along(lay, d, v.shape[d])  # in position order where the axis is one channel axis
        # pure only on one channel axis that is not axis 0: at batch 1 a batch merged into the
        # channels (timm's B * heads) looks like channels, and its count would not be a constant
        if vec is not None and (vec >= 0).all() and len(np.unique(vec)) == len(vec):
            return ChannelCount(vec, pure=d != 0)
        return ChannelCount(np.unique(lay[lay >= 0]), pure=False)
    if dim is not None:
        return count(dim % v.dim())
    return tuple(count(d) for d in range(v.dim()))


@register("size")
def size_rule(ctx, node):
    return size_layout(ctx, node.args[0], ctx.arg(1, "dim"))


@register("numel", "nelement", torch.numel)
def numel_rule(ctx, node):
    lay = ctx.layout(node.args[0])
    if isinstance(lay, np.ndarray) and (lay >= 0).any():
        return ChannelCount(np.unique(lay[lay >= 0]), pure=False)  # counts the batch too
    return None


@register("dim", "element_size", "is_contiguous")  # len(x): the tracer answers it from the shape
def no_channels_rule(ctx, node):
    """Ranks, dtypes and other Python values carry no channels."""
    return None
