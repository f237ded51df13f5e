"""Registry entries for ops that move, address or reduce the channel axis: reshapes,
permutes, cat/stack, split/chunk/narrow/slicing, channel pad, pixel and channel shuffle,
GLU, and reductions.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import surgery_rules as S
from .atoms import NONE, UNKNOWN, along, carrying_axes, filled, on_axis, reshape_layout
from .flow_types import ChannelCount, Grid, NonEmpty
from .registry import register
from .rules_core import broadcast_rule


# ----------------------------------------------------------------------------- reshapes


def reshape_rule(ctx, node):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: atoms follow the memory order; a
    channel axis split into several axes (a shuffle's view) must keep whole columns."""
    x = node.args[0] if node.args else node.kwargs["input"]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    new = reshape_layout(lay, tuple(v.shape), tuple(out.shape))
    if new is None:
        return ctx.unknown(f"{ctx.where()}: reshape not followed")
    for d, count in _size_counts(ctx, node, out.dim()).items():
        _check_count(ctx, new, d, out.shape[d], count)
    if len(carrying_axes(new)) > 1 and (new >= 0).any():
        ctx.constrain(Grid(new.copy(), f"{ctx.where()}"))
        ctx.table.tag(new, "shuffle")
    return new


def _size_counts(ctx, node, nd: int) -> dict:
    """Output axis -> ChannelCount for the sizes of view/reshape/unflatten read from a shape."""
    _, first, sizes, _ = S.reshape_sizes(node, nd)
    counts = {first + i: ctx.layout(s) for i, s in enumerate(sizes) if isinstance(s, fx.Node)}
    return {d: c for d, c in counts.items() if isinstance(c, ChannelCount) and d < nd}


def _check_count(ctx, new: np.ndarray, d: int, extent: int, count: ChannelCount) -> None:
    """A size read from a channel axis follows that axis's pruned extent at run time, so the
    output axis it sizes must carry those channels. Where it carries other channels of the
    same extent they are pruned alike (unified); where it carries none (attention heads x
    head dim sized by the stream's width, as in EdgeNeXt's XCA) the count must not change,
    and its channels are frozen."""
    carried = np.unique(new[new >= 0]) if new.shape[d] > 1 else np.zeros(0, np.int64)
    if carried.size and np.isin(carried, count.atoms).all():
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
         surgery=S.reshape_surgery)(reshape_rule)


@register("permute", "transpose", "t", "movedim", "swapaxes", "mT", torch.permute, torch.transpose,
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
    ctx.freeze(lay, f"{ctx.where()}: one channel expanded over many")
    if node.target == "expand_as":
        source = ctx.layout(node.args[1])
        follow = {d: along(source, d, out.shape[d]) for d in grown} if isinstance(source, np.ndarray) else {}
    else:
        sizes = node.args[1:] if node.target == "expand" else (node.args[1],)
        sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)
        sizes = [None] * (nd - len(sizes)) + sizes
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
        new = ctx.unify(new, on_axis(atoms, d, nd)) if (new >= 0).any() else np.where(
            new == UNKNOWN, UNKNOWN, on_axis(atoms, d, nd))
    return new


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
    if not any(lay.shape[dim] > 1 for lay in lays) and all(v.shape[dim] == 1 for _, v in items):
        return ctx.unify(*lays)
    if not any(lay.shape[dim] > 1 for lay in lays) and all((lay < 0).all() for lay in lays):
        return ctx.unify(*lays)
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


# ----------------------------------------------------------------------------- addressing


def _pieces_rule(ctx, node, dim):
    x = node.args[0]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    dim %= v.dim()
    if lay.shape[dim] == 1:
        return type(out)(lay for _ in out)
    atoms = along(lay, dim, v.shape[dim])
    if atoms is None:
        return ctx.unknown(f"{ctx.where()}: channels on several axes")
    pieces, start = [], 0
    for piece in out:
        width = piece.shape[dim]
        part = atoms[start:start + width]
        ctx.constrain(NonEmpty(part, f"piece of {ctx.where()}"))
        ctx.table.tag(part, "split")
        pieces.append(on_axis(part, dim, v.dim()))
        start += width
    return type(out)(pieces)


@register(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split", "split_with_sizes",
          surgery=S.split_surgery)
def split_rule(ctx, node):
    dim = ctx.arg(2, "dim", 0)
    return _pieces_rule(ctx, node, dim)


@register(torch.unbind, "unbind")
def unbind_rule(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    dim = ctx.arg(1, "dim", 0) % ctx.val(x).dim()
    if lay.shape[dim] > 1:
        return ctx.unknown(f"{ctx.where()}: unbinds the channel axis")
    return type(ctx.out())(np.squeeze(lay, dim) for _ in ctx.out())


@register(torch.narrow, "narrow", surgery=S.narrow_surgery)
def narrow_rule(ctx, node):
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    dim, start, length = (ctx.val(a) for a in node.args[1:4])
    dim %= v.dim()
    if lay.shape[dim] == 1:
        return lay
    atoms = along(lay, dim, v.shape[dim])
    if atoms is None:
        return ctx.unknown(f"{ctx.where()}: channels on several axes")
    part = atoms[start:start + length]
    ctx.constrain(NonEmpty(part, f"{ctx.where()}"))
    ctx.table.tag(part, "split")
    return on_axis(part, dim, v.dim())


def normalized_index(index, ndim: int, resolve) -> list | None:
    """A tensor index as a list with Ellipsis expanded; None for advanced indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [resolve(i) for i in items]
    if any(isinstance(i, (torch.Tensor, list, fx.Node)) or (i is not None and not isinstance(i, (int, slice)) and i is not Ellipsis)
           for i in items):
        return None
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[k:k + 1] = [slice(None)] * (ndim - used)
    used = sum(1 for i in items if i is not None)
    return items + [slice(None)] * (ndim - used)


def _resolve_value(item):
    """Concrete value of an index item whose parts may be graph nodes (sizes)."""
    val = lambda p: p.meta.get("val") if isinstance(p, fx.Node) else p  # noqa: E731
    if isinstance(item, slice):
        return slice(val(item.start), val(item.stop), val(item.step))
    return val(item)


@register(operator.getitem, surgery=S.getitem_surgery)
def getitem_rule(ctx, node):
    container, index = node.args
    lay = ctx.flow.layouts.get(container) if isinstance(container, fx.Node) else None
    if not isinstance(ctx.val(container), torch.Tensor):
        if lay is None:
            return None
        try:
            return lay[index]
        except (IndexError, KeyError, TypeError):
            return ctx.unknown()
    lay = ctx.layout(container)
    items = normalized_index(index, lay.ndim, _resolve_value)
    if items is None:
        return ctx.unknown(f"{ctx.where()}: advanced indexing")
    np_index, d = [], 0
    for item in items:
        if item is None:
            np_index.append(None)
            continue
        if lay.shape[d] == 1:
            np_index.append(0 if isinstance(item, int) else slice(None))
        else:
            if isinstance(item, int):
                ctx.freeze(lay, f"{ctx.where()}: picks single channels")
            np_index.append(item)
        d += 1
    out = lay[tuple(np_index)]
    if any(isinstance(i, slice) and lay.shape[k] > 1 and i != slice(None)
           for k, i in enumerate(x for x in items if x is not None)):
        ctx.constrain(NonEmpty(out.reshape(-1), f"{ctx.where()}"))
        ctx.table.tag(out, "split")
    return np.ascontiguousarray(out)


@register(F.pad, surgery=S.pad_surgery)
def pad_rule(ctx, node):
    """Spatial pad passes channels through; a constant pad on the channel axis adds
    channels owned by the pad (the CIFAR ResNet option-A shortcut)."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    pad = list(ctx.val(ctx.arg(1, "pad")))
    mode = ctx.arg(2, "mode", "constant")
    nd = v.dim()
    for j in range(len(pad) // 2):
        d = nd - 1 - j
        before, after = pad[2 * j], pad[2 * j + 1]
        if (before, after) == (0, 0) or (lay.shape[d] == 1 and (d >= 2 or v.shape[d] > 1)):
            continue  # an axis that carries no channels (spatial, or H of a channels-last map)
        if d == 0 and lay.shape[0] == 1:
            continue
        atoms = along(lay, d, v.shape[d])
        if atoms is None or mode != "constant" or before < 0 or after < 0:
            return ctx.unknown(f"{ctx.where()}: pads the channel axis")
        extra = ctx.owned(before + after, "const", key=node.name)
        ctx.table.tag(extra, "pad")
        lay = on_axis(np.concatenate([extra[:before], atoms, extra[before:]]), d, nd)
    return lay


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


# ----------------------------------------------------------------------------- reductions

EXACT_FILL = {"sum": 0.0, "mean": 0.0, "amax": float("-inf"), "max": float("-inf"),
              "amin": float("inf"), "min": float("inf")}
REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "std", "var", "prod", "norm", "logsumexp",
              "nansum", "nanmean")


def reduce_rule(ctx, node):
    """Reductions over spatial axes pass channels through; over the channel axis, sum,
    mean, max and min become exact mask sites, the others are inexact."""
    x = node.args[0] if node.args else node.kwargs["input"]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = ctx.arg(1, "dim", None)
    if len(node.args) > 1 and isinstance(ctx.val(node.args[1]), torch.Tensor):
        return broadcast_rule(ctx, node)  # torch.max(a, b) is element-wise
    keepdim = bool(ctx.arg(2, "keepdim", False))
    nd = v.dim()
    dims = list(range(nd)) if dims is None or dims == [] else [d % nd for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    crossing = [d for d in dims if lay.shape[d] > 1]
    if crossing:
        axes = carrying_axes(lay)
        if name in EXACT_FILL and len(axes) == 1:
            ctx.site(0, along(lay, axes[0], v.shape[axes[0]]), axes[0], "reduce", EXACT_FILL[name])
            if isinstance(out, tuple) and any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
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


register(*REDUCTIONS, *(getattr(torch, n) for n in REDUCTIONS), surgery=S.reduce_surgery)(reduce_rule)
