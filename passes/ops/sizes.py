"""The size arguments of view/reshape/unflatten: where each output axis takes its size
from (an int, a channel count, another run-time value), and how surgery re-emits them
(Hugging Face's ``x.size()[:-2] + (all_head_size,)`` and whole shapes included).

Example::

    kind, first, sizes, packed = reshape_sizes(node, ndim)   # ("view", 0, [b, n, 4, 16], False)
    axis_sizes(ctx, node, ndim)                             # {2: "constant", 3: ChannelCount(...)}
"""
from __future__ import annotations

import operator

import numpy as np
import torch.fx as fx

from ..flow_types import ChannelCount


def pure_count(sctx, s, layout, d: int | None) -> bool:
    """A size node that is a pure channel count (a model constant) sizing axis ``d`` of
    ``layout`` that does not carry those channels: re-emitted as an int. One that sizes its
    own channels follows them at run time and stays (exporters keep its shape arithmetic)."""
    return constant_count(sctx.flow.layouts.get(s) if isinstance(s, fx.Node) else None, layout, d)


def constant_count(lay, layout, d: int | None) -> bool:
    """``pure_count`` for the layout ``lay`` of a size (a node's, or an item of a shape's)."""
    if not (isinstance(lay, ChannelCount) and lay.pure):
        return False
    if d is None or not isinstance(layout, np.ndarray) or layout.shape[d] == 1:
        return True
    carried = np.unique(layout[layout >= 0])
    return not (carried.size and np.isin(carried, lay.atoms).all())


def joined_sizes(node, nd: int) -> bool:
    """Whether a view's sizes come as one concatenated tuple (``x.size()[:-2] + (c,)``)."""
    _, _, sizes, _ = reshape_sizes(node, nd)
    return len(sizes) == 1 and concatenated_sizes(sizes[0])


def concatenated_sizes(arg) -> bool:
    """``x.size()[:-2] + (all_head_size,)`` (Hugging Face's attention): a shape node plus a
    tuple of int constants, on either side."""
    if not isinstance(arg, fx.Node) or arg.target is not operator.add or len(arg.args) != 2:
        return False
    return sum(isinstance(a, tuple) and all(isinstance(i, int) for i in a) for a in arg.args) == 1


def constant_size(s) -> int | None:
    """An int size, or an item of a concatenated size that is one of its constants
    (``view(*(x.size()[:-2] + (768,)))`` traces to ``getitem(add, 2)``); else None."""
    if isinstance(s, int):
        return s
    if not (isinstance(s, fx.Node) and s.target is operator.getitem and concatenated_sizes(s.args[0])):
        return None
    add, i = s.args
    whole = add.meta.get("val")
    if not isinstance(i, int) or not isinstance(whole, (tuple, list)):
        return None
    left, right = add.args
    at = len(whole) - len(right) if isinstance(right, tuple) else 0
    const = right if isinstance(right, tuple) else left
    i = i % len(whole)
    return const[i - at] if at <= i < at + len(const) else None


def reemit_concatenated(sctx, node, extents: list[int]) -> None:
    """Re-emit the constant side of a concatenated size with the pruned extents of the output
    axes it sizes (the last ones when it comes second), as a new node: the old one may have
    other users."""
    add = node.args[1]
    left, right = add.args
    const = right if isinstance(right, tuple) else left
    at = len(extents) - len(const) if const is right else 0
    new = tuple(extents[at + i] if s != -1 else s for i, s in enumerate(const))
    if new == const:
        return
    with sctx.graph.inserting_before(node):
        joined = sctx.graph.call_function(operator.add, (left, new) if const is right else (new, right))
    node.args = (node.args[0], joined, *node.args[2:])


def whole_shape(arg) -> bool:
    """A view's sizes given as one traced shape (``x.reshape(y.shape)``, DPT's
    ``reshape(feature_shape)``): each item sizes the output axis of its position."""
    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), (tuple, list))


def reemit_whole_shape(sctx, node, extents: list[int], layout) -> None:
    """A whole shape whose items include pure counts sizing other channels (the readout
    projection's output reshaped to the stream's shape): the size becomes a tuple of its
    items, those counts written as the pruned extents, the rest read from the shape."""
    shape = node.args[1]
    items = sctx.flow.layouts.get(shape)
    items = items if isinstance(items, tuple) else (None,) * len(extents)
    if not any(constant_count(lay, layout, d) for d, lay in enumerate(items)):
        return
    new = []
    with sctx.graph.inserting_before(node):
        for d, lay in enumerate(items):
            new.append(extents[d] if constant_count(lay, layout, d)
                       else sctx.graph.call_function(operator.getitem, (shape, d)))
    node.args = (node.args[0], tuple(new), *node.args[2:])


def reshape_sizes(node, ndim: int) -> tuple:
    """``(kind, first output axis, size arguments, packed)`` of a view/reshape (kind "view")
    or unflatten call, ``packed`` when the sizes came as one tuple; kind None otherwise.
    The flow rule reads the sizes that come from shapes, the surgery rule re-emits them."""
    if node.op == "call_module":
        return None, 0, [], False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("view", "reshape"):
        sizes = node.args[1:]
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        return "view", 0, list(sizes[0]) if packed else list(sizes), packed
    if name == "unflatten" and len(node.args) > 2:
        return "unflatten", node.args[1] % ndim, list(node.args[2]), True
    return None, 0, [], False


CONSTANT = "constant"


def axis_sizes(ctx, node, nd: int) -> dict:
    """Output axis -> where a view/reshape/unflatten takes its size from: ``CONSTANT`` (an
    int, or a constant item of a concatenated size: surgery re-emits it), a ChannelCount (read
    from a channel axis: it follows that axis), or None (another run-time value, which stays as
    traced). Axes sized by -1 or not named are left out."""
    _, first, sizes, _ = reshape_sizes(node, nd)
    if len(sizes) == 1 and (concatenated_sizes(sizes[0]) or whole_shape(sizes[0])):
        items = []
        for side in (sizes[0].args if concatenated_sizes(sizes[0]) else sizes):
            lay = side if isinstance(side, tuple) else ctx.flow.layouts.get(side)
            n = len(side) if isinstance(side, tuple) else len(ctx.val(side))
            items += [CONSTANT] * n if isinstance(side, tuple) else (
                list(lay) if isinstance(lay, tuple) and len(lay) == n else [None] * n)
        named = dict(enumerate(items))
    else:
        named = {}
        for i, s in enumerate(sizes):
            if constant_size(s) is not None:
                named[first + i] = CONSTANT
            elif isinstance(s, fx.Node) and not (isinstance(ctx.val(s), int) and ctx.val(s) == -1):
                lay = ctx.layout(s)
                named[first + i] = lay if isinstance(lay, ChannelCount) else None
    return {d: src for d, src in named.items() if d < nd}
