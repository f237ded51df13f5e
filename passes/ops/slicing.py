"""Ops that address channel positions: split/chunk/tensor_split, unbind, roll and flip,
narrow, slicing and indexing, and pad on the channel axis; each surgery re-emits the op with
the pruned sizes or selects the kept positions with a constant ``index_select``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..atoms import along, carrying_axes, known_grid, on_axis
from ..flow_types import NonEmpty
from ..registry import node_arg, register

# ----------------------------------------------------------------------------- surgery


def split_surgery(sctx, node):
    """split/chunk on the channel axis become ``torch.split`` with the kept sizes."""
    pieces = sctx.layout(node)
    x = node.args[0]
    dim = node_arg(node, 2, "dim", 0)
    dim %= x.meta["val"].dim()
    if all(p.shape[dim] == 1 for p in pieces):
        return
    sizes = [_kept_along(sctx.keep(p), dim) for p in pieces]
    node.op, node.target, node.args, node.kwargs = "call_function", torch.split, (x, sizes, dim), {}


def _kept_along(keep: np.ndarray, dim: int) -> int:
    """Kept positions along ``dim`` of a piece's keep mask (a position of a multi-axis piece
    is kept whole or dropped whole: a Grid keeps whole columns)."""
    keep = np.moveaxis(np.atleast_1d(keep), dim, 0)
    return int(keep.reshape(keep.shape[0], -1).any(1).sum())


def narrow_surgery(sctx, node):
    x, dim, start, _ = node.args[:4]
    v = x.meta["val"]
    dim %= v.dim()
    if sctx.layout(x).shape[dim] == 1:
        return
    keep_in = sctx.keep_along(x, dim)
    start_val = start.meta["val"] if hasattr(start, "meta") else start
    node.args = (x, dim, int(keep_in[:start_val].sum()), int(sctx.keep_along(node, dim).sum()))


def getitem_surgery(sctx, node):
    """Slicing the channel axis: select the kept positions first, then slice the rest."""
    container, index = node.args
    if not isinstance(container.meta.get("val"), torch.Tensor):
        return
    lay_in = sctx.layout(container)
    items = normalized_index(index, lay_in.ndim, _resolve_value)
    if items is None:
        return
    new_items, d = list(index) if isinstance(index, tuple) else [index], 0
    raw_positions = [k for k, i in enumerate(new_items) if i is not None]
    raw_positions = [k for k in raw_positions if new_items[k] is not Ellipsis]
    for item in items:
        if item is None:
            continue
        if isinstance(item, slice) and lay_in.shape[d] > 1 and item != slice(None):
            n = container.meta["val"].shape[d]
            chosen = np.arange(n)[item]
            keep_in = sctx.keep_along(container, d)
            ranks = np.cumsum(keep_in) - 1
            kept = chosen[keep_in[chosen]]
            idx = ranks[kept]
            with sctx.graph.inserting_before(node):
                container = sctx.graph.call_function(torch.index_select, (container, d, sctx.const(idx)))
            k = _raw_index(index, d, lay_in.ndim)
            new_items[k] = slice(None)
        d += 1
    node.args = (container, tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _raw_index(index, axis: int, ndim: int) -> int:
    """Position in the raw index tuple that addresses input axis ``axis`` of an ``ndim``
    tensor (an Ellipsis stands for the axes no other item addresses)."""
    items = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    d = 0
    for k, item in enumerate(items):
        if item is None:
            continue
        if item is Ellipsis:
            d += ndim - used
            continue
        if d == axis:
            return k
        d += 1
    raise ValueError("index does not address the axis")


def pad_surgery(sctx, node):
    x = node.args[0]
    pad = list(node_arg(node, 1, "pad"))
    v = x.meta["val"]
    nd = v.dim()
    out_lay = sctx.layout(node)
    for j in range(len(pad) // 2):
        d = nd - 1 - j
        before, after = pad[2 * j], pad[2 * j + 1]
        if (before, after) == (0, 0) or out_lay.shape[d] == 1 or out_lay.shape[d] == v.shape[d]:
            continue
        keep = sctx.keep_along(node, d)
        pad[2 * j], pad[2 * j + 1] = int(keep[:before].sum()), int(keep[len(keep) - after:].sum())
    node.args = (x, tuple(pad), *node.args[2:])


# ----------------------------------------------------------------------------- rules


def _pieces_rule(ctx, node, dim):
    x = node.args[0]
    lay, v, out = ctx.layout(x), ctx.val(x), ctx.out()
    dim %= v.dim()
    if lay.shape[dim] == 1:
        return type(out)(lay for _ in out)
    atoms = along(lay, dim, v.shape[dim])
    if atoms is None:
        return _grid_pieces(ctx, lay, dim, out)
    pieces, start = [], 0
    for piece in out:
        width = piece.shape[dim]
        part = atoms[start:start + width]
        ctx.constrain(NonEmpty(part, f"piece of {ctx.where()}"))
        ctx.table.tag(part, "split")
        pieces.append(on_axis(part, dim, v.dim()))
        start += width
    return type(out)(pieces)


def _grid_pieces(ctx, lay, dim, out):
    """Blocks of a channel grid split along one of its axes (YOLO12's area attention views
    one projection as heads x [q | k | v] and splits the second axis): each piece keeps its
    rows and columns; none may empty."""
    if not known_grid(lay):
        return ctx.unknown(f"{ctx.where()}: channels on several axes")
    pieces, start = [], 0
    for piece in out:
        part = np.take(lay, range(start, start + piece.shape[dim]), axis=dim)
        ctx.constrain(NonEmpty(part.reshape(-1).copy(), f"piece of {ctx.where()}"))
        ctx.table.tag(part, "split")
        pieces.append(part)
        start += piece.shape[dim]
    return type(out)(pieces)


@register(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split", "split_with_sizes",
          surgery=split_surgery)
def split_rule(ctx, node):
    dim = ctx.arg(2, "dim", 0)
    return _pieces_rule(ctx, node, dim)


@register(torch.unbind, "unbind")
def unbind_rule(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    dim = ctx.arg(1, "dim", 0) % ctx.val(x).dim()
    if lay.shape[dim] == 1:
        return type(ctx.out())(np.squeeze(lay, dim) for _ in ctx.out())
    if not known_grid(lay):
        return ctx.unknown(f"{ctx.where()}: unbinds the channel axis")
    # a stacked axis of channel blocks (timm's qkv: (3, heads, dim) from one projection): each
    # slice keeps its own channels; none may empty, or the number of slices would change
    pieces = [np.take(lay, i, axis=dim) for i in range(lay.shape[dim])]
    for i, piece in enumerate(pieces):
        ctx.constrain(NonEmpty(piece.reshape(-1).copy(), f"slice {i} of {ctx.where()}"))
    return type(ctx.out())(pieces)


def _axes_arg(ctx, index: int, name: str, nd: int) -> list[int] | None:
    dims = ctx.arg(index, name, None)
    if dims is None:
        return None
    return [d % nd for d in ([dims] if isinstance(dims, int) else dims)]


@register(torch.roll, "roll")
def roll_rule(ctx, node):
    """``roll`` along axes that carry no channels (Swin's shifted windows) moves positions
    only. Along a channel axis, or flattened, the shift would reach other channels once
    some are pruned: not followed."""
    lay = ctx.layout(node.args[0])
    dims = _axes_arg(ctx, 2, "dims", ctx.val(node.args[0]).dim())
    carried = (lay >= 0).any() if dims is None else any(lay.shape[d] > 1 for d in dims)
    if carried:
        return ctx.unknown(f"{ctx.where()}: rolls the channel axis")
    return lay


@register(torch.flip, "flip")
def flip_rule(ctx, node):
    """``flip`` reverses positions: a channel axis keeps its atoms, reversed (the kept
    channels of a flip are the flip of the kept channels)."""
    x = node.args[0]
    dims = _axes_arg(ctx, 1, "dims", ctx.val(x).dim())
    if node.target == "flip" and len(node.args) > 2:  # x.flip(1, 2)
        dims = [d % ctx.val(x).dim() for d in node.args[1:]]
    lay = ctx.layout(x)
    return np.flip(lay, [d for d in dims if lay.shape[d] > 1]).copy()


@register(torch.narrow, "narrow", surgery=narrow_surgery)
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


@register(operator.getitem, surgery=getitem_surgery)
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
                lay = _pick_block(ctx, lay, d)
            np_index.append(item)
        d += 1
    out = lay[tuple(np_index)]
    if any(isinstance(i, slice) and lay.shape[k] > 1 and i != slice(None)
           for k, i in enumerate(x for x in items if x is not None)):
        ctx.constrain(NonEmpty(out.reshape(-1), f"{ctx.where()}"))
        ctx.table.tag(out, "split")
    return np.ascontiguousarray(out)


@register(torch.gather, "gather")
def gather_rule(ctx, node):
    """``torch.gather(x, dim, index)`` along an axis without channels (tokens picked by
    score: DETR-style query selection, ViTMAE's masking): every other axis keeps x's
    positions, so a channel axis passes where the index spans it with a size that follows
    the channels (grown over it by a count read from x). An index of a constant extent
    there, or a gather along a channel axis, freezes; the index's own channels are read as
    positions and frozen."""
    x, index = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs["index"]
    lay, idx = ctx.layout(x), ctx.layout(index)
    dim = ctx.arg(1, "dim") % lay.ndim
    if lay.shape[dim] > 1:
        return ctx.unknown(f"{ctx.where()}: gathers along a channel axis")
    idx = idx.reshape((1,) * (lay.ndim - idx.ndim) + idx.shape)
    spread = np.zeros(0, np.int64)
    for a in carrying_axes(lay):
        mine, theirs = along(lay, a, lay.shape[a]), along(idx, a, lay.shape[a])
        if theirs is None or idx.shape[a] != lay.shape[a] or not np.array_equal(
                ctx.table.find(mine), ctx.table.find(theirs)):
            why = f"{ctx.where()}: the index does not follow the channels it spans"
            ctx.freeze([lay, idx], why)
            return lay
        spread = np.concatenate([spread, theirs])
    own = idx[(idx >= 0) & ~np.isin(idx, spread)]
    ctx.freeze(own, f"{ctx.where()}: channels read as positions")
    return lay


@register(operator.setitem)
def setitem_rule(ctx, node):
    """``t[index] = v`` (RT-DETR's table of level shapes, BEiT's relative coordinates): an
    in-place write that the layouts of ``t``'s readers do not see, so the channels of ``t``
    and of ``v`` are frozen (a table without channels loses nothing). Its value is None."""
    for arg in node.all_input_nodes:
        ctx.freeze(ctx.layout(arg), f"{ctx.where()}: written in place")
    return None


def _pick_block(ctx, lay: np.ndarray, d: int) -> np.ndarray:
    """An int index on a channel axis. Of a grid of channel blocks (segformer's ``kv[0]``,
    ``kv[1]`` of a (2, heads, dim) view) it picks a block: the blocks are unified position by
    position, so every block keeps the same positions and the index still picks the same
    block after pruning (a Grid dropping columns across the blocks costs nothing more). Of a
    plain channel vector it picks single channels: frozen."""
    if not known_grid(lay):
        ctx.freeze(lay, f"{ctx.where()}: picks single channels")
        return lay
    blocks = [np.take(lay, i, axis=d) for i in range(lay.shape[d])]
    for b in blocks[1:]:
        ctx.unify(blocks[0], b)
    ctx.constrain(NonEmpty(blocks[0].reshape(-1).copy(), f"block of {ctx.where()}"))
    return lay


@register(F.pad, surgery=pad_surgery)
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
