"""Surgery rules: how each op's node or module is rewritten once channels are dropped.

Each rule is ``rule(sctx, node)``; ``sctx`` (see ``surgery.SurgeryContext``) answers which
positions of any value survive (``keep_along``), which positions a mask site keeps
(``site_keep``), and edits the graph. Rules touch only their own node and module.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from .registry import node_arg


def _param(old: torch.Tensor | None, new: torch.Tensor | None):
    if old is None:
        return None
    new = new.detach().clone().contiguous()
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def _idx(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind."""
    old = getattr(module, name)
    if name in module._parameters:
        module._parameters[name] = _param(old, value)
    else:
        module._buffers[name] = value.detach().clone().contiguous()


def slice_conv(m: nn.Module, in_keep: np.ndarray, out_keep: np.ndarray) -> None:
    """Slice a (transposed, grouped, depthwise) conv's weight and bias in place."""
    w = m.weight.data
    ik, ok = _idx(in_keep), _idx(out_keep)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    g = m.groups
    if transposed:
        w = w[ik][:, ok]
    elif g == 1:
        w = w[ok][:, ik]
    elif g == m.in_channels:  # depthwise, any channel multiplier
        w = w[ok]
        g = len(ik)
    else:  # grouped: every group keeps the same count (Balance constraint)
        ip, op = m.in_channels // g, m.out_channels // g
        rows = []
        for b in range(g):
            ob = _idx(out_keep[b * op:(b + 1) * op]) + b * op
            ib = _idx(in_keep[b * ip:(b + 1) * ip])
            rows.append(w[ob][:, ib])
        w = torch.cat(rows, 0)
    set_tensor(m, "weight", w)
    if m.bias is not None:
        set_tensor(m, "bias", m.bias.data[ok])
    m.in_channels, m.out_channels, m.groups = len(ik), len(ok), g


def conv_surgery(sctx, node):
    m = sctx.module(node)
    if not sctx.first_call(node):
        return
    out_keep = sctx.keep_along(node, 1)
    site = sctx.site_of(node)
    in_keep = sctx.site_keep(site) if site is not None else sctx.keep_along(node.args[0], 1)
    slice_conv(m, in_keep, out_keep)


def linear_surgery(sctx, node):
    m = sctx.module(node)
    if not sctx.first_call(node):
        return
    ok, ik = _idx(sctx.keep_along(node, -1)), _idx(sctx.site_keep(sctx.site_of(node)))
    set_tensor(m, "weight", m.weight.data[ok][:, ik])
    if m.bias is not None:
        set_tensor(m, "bias", m.bias.data[ok])
    m.in_features, m.out_features = len(ik), len(ok)


def functional_weight_surgery(sctx, node):
    """``F.conv2d`` / ``F.linear`` on a plain parameter: slice the weight (the bias is a
    one-axis parameter, sliced by the generic parameter pass)."""
    w = node_arg(node, 1, "weight")
    if not sctx.first_call(node, key=w.target):
        return
    axis = -1 if node.target is torch.nn.functional.linear else 1
    site = sctx.site_of(node)  # none where the input carries no prunable channel (e.g. the image)
    x = node_arg(node, 0, "input")
    in_keep = sctx.site_keep(site) if site is not None else sctx.keep_along(x, axis)
    out_keep = sctx.keep_along(node, axis)
    if out_keep.all() and in_keep.all():
        return  # nothing dropped (a grouped or computed-weight conv is frozen by its rule)
    ok, ik = _idx(out_keep), _idx(in_keep)
    owner, name = sctx.owner_of(w.target)
    set_tensor(owner, name, getattr(owner, name).data[ok][:, ik])


def norm_surgery(sctx, node):
    m = sctx.module(node)
    if not sctx.first_call(node):
        return
    c = node.meta["val"].shape[1]
    keep = _idx(sctx.keep_along(node, 1))
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and t.dim() == 1 and t.shape[0] == c:
            set_tensor(m, name, t.data[keep])
    k = len(keep)
    if isinstance(m, nn.GroupNorm):
        if m.num_groups == m.num_channels:
            m.num_groups = k
        m.num_channels = k
    elif isinstance(m, nn.PReLU):
        m.num_parameters = k
    elif hasattr(m, "num_features"):
        m.num_features = k


def layer_norm_surgery(sctx, node):
    """Channel LayerNorm, exact: statistics over the original C0 channels, the dropped
    ones counted as the zeros the hard mask writes there."""
    from .rules_core import layer_norm_parts
    site = sctx.site_of(node)
    if site is None:
        return
    x, _, weight, bias, eps = layer_norm_parts(node, sctx.modules)
    keep = sctx.site_keep(site)
    c0, k = len(keep), int(keep.sum())
    g = sctx.graph
    if node.op == "call_module":
        m = sctx.module(node)
        if sctx.first_call(node):
            for name in ("weight", "bias"):
                if getattr(m, name) is not None:
                    set_tensor(m, name, getattr(m, name).data[_idx(keep)])
            m.normalized_shape = (k,)
        with g.inserting_before(node):
            weight = g.get_attr(f"{node.target}.weight") if m.weight is not None else None
            bias = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
    with g.inserting_before(node):
        mu = g.call_function(operator.truediv, (g.call_function(torch.sum, (x, -1), {"keepdim": True}), c0))
        d = g.call_function(operator.sub, (x, mu))
        ss = g.call_function(torch.sum, (g.call_function(operator.mul, (d, d)), -1), {"keepdim": True})
        var = g.call_function(operator.truediv, (g.call_function(operator.add, (
            ss, g.call_function(operator.mul, (g.call_function(operator.mul, (mu, mu)), float(c0 - k))))), c0))
        y = g.call_function(operator.mul, (d, g.call_function(torch.rsqrt, (
            g.call_function(operator.add, (var, eps)),))))
        if weight is not None:
            y = g.call_function(operator.mul, (y, weight))
        if bias is not None:
            y = g.call_function(operator.add, (y, bias))
    sctx.stands_for(y, node)  # later rules read its unpruned shape and layout from the LayerNorm
    node.replace_all_uses_with(y)
    g.erase_node(node)


def reshape_surgery(sctx, node):
    """Re-emit integer size constants of view/reshape/unflatten with the pruned extents."""
    layout = sctx.layout(node)
    if not isinstance(layout, np.ndarray) or not (layout >= 0).any():
        return
    extents = sctx.kept_extents(node)
    if node.op == "call_module":
        m = sctx.module(node)
        if isinstance(m, nn.Unflatten):
            dim = m.dim % len(extents)
            m.unflattened_size = tuple(extents[dim:dim + len(m.unflattened_size)])
        return
    kind, first, sizes, packed = reshape_sizes(node, len(extents))
    if kind is None:
        return
    new = [extents[first + i] if isinstance(s, int) and s != -1 else s for i, s in enumerate(sizes)]
    if kind == "unflatten":
        node.args = (node.args[0], node.args[1], tuple(new))
    else:
        node.args = (node.args[0], tuple(new)) if packed or node.target is torch.reshape else (node.args[0], *new)


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


def split_surgery(sctx, node):
    """split/chunk on the channel axis become ``torch.split`` with the kept sizes."""
    pieces = sctx.layout(node)
    x = node.args[0]
    dim = node_arg(node, 2, "dim", 0)
    dim %= x.meta["val"].dim()
    if all(p.shape[dim] == 1 for p in pieces):
        return
    sizes = [int(sctx.keep(p).reshape(-1).sum()) for p in pieces]
    node.op, node.target, node.args, node.kwargs = "call_function", torch.split, (x, sizes, dim), {}


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
    from .rules_shape import normalized_index, _resolve_value
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
