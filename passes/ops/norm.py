"""Normalisation ops: per-channel norms (BN, InstanceNorm, GroupNorm, PReLU) with their
parameter surgery, channel LayerNorm and GroupNorm made exact, LRN and softmax (inexact
over channels).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..atoms import UNKNOWN, along, carrying_axes, filled, fixed, on_axis
from ..flow_types import Balance
from ..registry import annotate, node_arg, register
from .tensors import same_shape_module, set_tensor, take

# ----------------------------------------------------------------------------- surgery


def norm_surgery(sctx, node):
    m = sctx.module(node)
    if not sctx.first_call(node):
        return
    c = node.meta["val"].shape[1]
    keep = sctx.keep_along(node, 1)
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and t.dim() == 1 and t.shape[0] == c:
            set_tensor(m, name, take(t.data, 0, keep))
    k = int(keep.sum())
    if isinstance(m, nn.GroupNorm):
        if m.num_groups == m.num_channels:
            m.num_groups = k
        m.num_channels = k
    elif isinstance(m, nn.PReLU):
        m.num_parameters = k
    elif hasattr(m, "num_features"):
        m.num_features = k


def group_norm_surgery(sctx, node):
    """nn.GroupNorm: per-channel parameters sliced; with several channels per group, the
    statistics re-emitted exactly (``_exact_group_norm``)."""
    m = sctx.module(node)
    norm_surgery(sctx, node)  # the per-channel weight and bias
    site = sctx.site_of(node)
    if m.num_groups == m.num_channels or site is None:
        return
    g = sctx.graph
    with g.inserting_before(node):
        params = [g.get_attr(f"{node.target}.{name}") if getattr(m, name) is not None else None
                  for name in ("weight", "bias")]
    _exact_group_norm(sctx, node, site, m.num_groups, *params, m.eps)


def functional_group_norm_surgery(sctx, node):
    """F.group_norm (timm's GroupNormAct, HF BiT): its parameters are sliced by the generic
    parameter pass; one channel per group re-emits ``num_groups``, several re-emit exactly."""
    site = sctx.site_of(node)
    x, groups, weight, bias, eps = _group_norm_args(node)
    if site is not None:
        _exact_group_norm(sctx, node, site, groups, weight, bias, eps)
    elif isinstance(groups, int):
        k = int(sctx.keep_along(x, 1).sum())
        node.args = (x, k, weight, bias, eps)
        node.kwargs = {}


def _group_norm_args(node):
    """(x, num_groups, weight, bias, eps) of an F.group_norm node."""
    return (node_arg(node, 0, "input"), node_arg(node, 1, "num_groups"), node_arg(node, 2, "weight"),
            node_arg(node, 3, "bias"), node_arg(node, 4, "eps", 1e-5))


def _exact_group_norm(sctx, node, site, groups: int, weight, bias, eps: float) -> None:
    """Replace a GroupNorm node with its statistics over each group's original C0/G
    channels, the dropped ones counted as the zeros the hard mask writes there (Balance
    keeps k/G in every group; ``_zero_padded_norm`` with share k/C0 per group).
    ``weight``/``bias``: nodes or None."""
    keep = sctx.site_keep(site)
    c0, k = len(keep), int(keep.sum())
    if k == c0:
        return
    x, g, ndim = node.args[0], sctx.graph, node.meta["val"].dim()
    with g.inserting_before(node):
        xg = g.call_method("unflatten", (x, 1, (groups, k // groups)))
        y = g.call_method("flatten", (_zero_padded_norm(g, xg, tuple(range(2, ndim + 1)), k / c0, eps), 1, 2))
        shape = (1, -1) + (1,) * (ndim - 2)
        for param, op in ((weight, operator.mul), (bias, operator.add)):
            if param is not None:
                y = g.call_function(op, (y, g.call_method("reshape", (param, shape))))
    _replace(sctx, node, y)


def _zero_padded_norm(g, x, dims: tuple, share: float, eps: float) -> fx.Node:
    """``(x - mu) / sqrt(var + eps)`` over ``dims`` as if the dropped entries (a fraction
    ``1 - share`` of the original ones) were there as zeros: mu = mean(x) share,
    var = mean((x - mu)^2) share + (1 - share) mu^2. Means over the kept values, so the
    extents of ``dims`` may differ from the traced ones."""
    mean = g.call_function(operator.mul, (g.call_method("mean", (x, dims), {"keepdim": True}), share))
    d = g.call_function(operator.sub, (x, mean))
    spread = g.call_method("mean", (g.call_function(operator.mul, (d, d)), dims), {"keepdim": True})
    var = g.call_function(operator.add, (g.call_function(operator.mul, (spread, share)), g.call_function(
        operator.mul, (g.call_function(operator.mul, (mean, mean)), 1.0 - share))))
    return g.call_function(operator.mul, (d, g.call_function(torch.rsqrt, (
        g.call_function(operator.add, (var, eps)),))))


def _replace(sctx, node, y: fx.Node) -> None:
    sctx.stands_for(y, node)  # later rules read its unpruned shape and layout from the norm
    node.replace_all_uses_with(y)
    sctx.graph.erase_node(node)


def layer_norm_surgery(sctx, node):
    """Channel LayerNorm, exact: statistics over the original C0 channels, the dropped
    ones counted as the zeros the hard mask writes there."""
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
                    set_tensor(m, name, take(getattr(m, name).data, 0, keep))
            m.normalized_shape = (k,)
        with g.inserting_before(node):
            weight = g.get_attr(f"{node.target}.weight") if m.weight is not None else None
            bias = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
    with g.inserting_before(node):
        y = _zero_padded_norm(g, x, (-1,), k / c0, eps)
        if weight is not None:
            y = g.call_function(operator.mul, (y, weight))
        if bias is not None:
            y = g.call_function(operator.add, (y, bias))
    _replace(sctx, node, y)


# ----------------------------------------------------------------------------- rules


def norm_rule(ctx, node):
    """Per-channel normalisation (axis 1); its parameters own atoms tied to the input's."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    if lay is None or v.dim() < 2:
        return ctx.unknown()
    atoms = along(lay, 1, v.shape[1])
    if atoms is None:
        return ctx.unknown(f"{ctx.where()}: channels not on axis 1")
    m = ctx.module
    has_state = any(p is not None and p.dim() == 1 and p.shape[0] == v.shape[1]
                    for p in (*m._parameters.values(), *m._buffers.values()))
    if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
        # made exact (group_norm_surgery): a mask site, as its statistics read the channels
        # as a whole, and the same kept count in every group so they stay groups
        site = ctx.site(0, atoms, 1, kind="group_norm")
        ctx.constrain(Balance(atoms, m.num_groups, f"GroupNorm {node.target}", site))
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return lay
    if has_state:
        atoms = ctx.unify(fixed(atoms), ctx.owned(v.shape[1], "norm"))
        ctx.table.tag(atoms, "norm")
    return on_axis(atoms, 1, v.dim())


def group_norm_chain(m, node) -> str | None:
    """A GroupNorm sits in a site group's chain only with one channel per group: with more,
    its statistics span each group, and the channels selected before the chain would
    change them (MobileViTV2's ``GroupNorm(1, C)`` before its attention and FFN convs)."""
    return "norm" if m is not None and m.num_groups == m.num_channels else None


register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU,
         surgery=norm_surgery, chain="norm")(norm_rule)
register(nn.GroupNorm, surgery=group_norm_surgery, chain=group_norm_chain)(norm_rule)
annotate(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, shape=same_shape_module)
annotate(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, bn="site")  # SCP reads their gamma, beta


@register(F.batch_norm, F.instance_norm, chain="norm")
def functional_norm_rule(ctx, node):
    """``F.batch_norm(x, mean, var, weight, bias, ...)``: x's channels unify with each
    parameter's atoms (sliced by the generic parameter surgery)."""
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    atoms = along(lay, 1, v.shape[1]) if lay is not None and v.dim() >= 2 else None
    if atoms is None:
        return ctx.unknown()
    params = [a for a in list(node.args[1:5]) + [node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
              if a is not None and hasattr(a, "op")]
    if any(p.op != "get_attr" for p in params):
        return ctx.unknown(f"{ctx.where()}: statistics not plain parameters")
    atoms = fixed(atoms)
    for p in params:
        atoms = ctx.unify(atoms, along(ctx.layout(p), 0, v.shape[1]))
    return on_axis(atoms, 1, v.dim())


annotate(F.batch_norm, bn="site")


@register(nn.LocalResponseNorm, F.local_response_norm)
def lrn_rule(ctx, node):
    lay = ctx.layout(node.args[0])
    ctx.inexact(lay, "LocalResponseNorm over channels")
    return lay


def layer_norm_parts(node, modules):
    """(x, normalized_shape, weight, bias, eps) of an nn.LayerNorm or F.layer_norm node;
    weight/bias are parameters (module) or graph nodes (functional)."""
    if node.op == "call_module":
        m = modules[node.target]
        return node.args[0], tuple(m.normalized_shape), m.weight, m.bias, m.eps
    get = lambda i, k, d=None: node.args[i] if len(node.args) > i else node.kwargs.get(k, d)  # noqa: E731
    return get(0, "input"), tuple(get(1, "normalized_shape")), get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5)


@register(nn.LayerNorm, F.layer_norm, surgery=layer_norm_surgery)
def layer_norm_rule(ctx, node):
    """LayerNorm over the channel axis is made exact: a mask site whose statistics are
    re-emitted over the original channel count. Over other axes it is per element."""
    x, shape, weight, bias, _ = layer_norm_parts(node, ctx.modules)
    lay, v = ctx.layout(x), ctx.val(x)
    normed = list(range(v.dim() - len(shape), v.dim()))
    if not any(lay.shape[d] > 1 for d in normed):
        return lay
    atoms = along(lay, -1, v.shape[-1])
    params = [p for p in (weight, bias) if isinstance(p, fx.Node)]
    if len(shape) != 1 or atoms is None or any(p.op != "get_attr" for p in params):
        ctx.freeze(lay, f"inexact: LayerNorm over several axes including channels at node {node.name}")
        return filled(UNKNOWN, v.dim())
    ctx.site(0, atoms, v.dim() - 1, kind="layer_norm")
    if node.op == "call_module" and weight is not None:
        atoms = ctx.unify(atoms, ctx.owned(v.shape[-1], "norm"))
    for p in params:
        atoms = ctx.unify(atoms, along(ctx.layout(p), 0, v.shape[-1]))
    return on_axis(atoms, -1, v.dim())


@register(F.group_norm, surgery=functional_group_norm_surgery)
def functional_group_norm_rule(ctx, node):
    """Functional GroupNorm on parameters (or none): per element when channels are not
    involved; over channels on axis 1, as nn.GroupNorm (exact, balanced per group); else frozen."""
    x, groups, weight, bias, _ = _group_norm_args(node)
    lay, v = ctx.layout(x), ctx.val(x)
    axes = carrying_axes(lay) if lay is not None else []
    if not axes:
        return lay
    params = [p for p in (weight, bias) if p is not None]
    if axes != [1] or not isinstance(groups, int) or groups < 1 \
            or v.shape[1] % groups or any(not isinstance(p, fx.Node) or p.op != "get_attr" for p in params):
        return ctx.unknown(f"{ctx.where()}: normalisation statistics over channels")
    atoms = along(lay, 1, v.shape[1])
    if groups != v.shape[1]:
        site = ctx.site(0, atoms, 1, kind="group_norm")
        ctx.constrain(Balance(atoms, groups, f"GroupNorm {node.name}", site))
    for p in params:
        atoms = ctx.unify(atoms, along(ctx.layout(p), 0, v.shape[1]))
    return on_axis(atoms, 1, v.dim())


def softmax_rule(ctx, node):
    x = node.args[0]
    lay, v = ctx.layout(x), ctx.val(x)
    m = ctx.module if node.op == "call_module" else None
    if isinstance(m, nn.Softmax2d):
        dim = -3
    else:
        dim = m.dim if m is not None else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    if dim is None or lay.shape[dim % v.dim()] > 1:
        ctx.inexact(lay, f"{ctx.where()} over channels")
    return lay


register(nn.Softmax, nn.Softmax2d, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax,
         torch.log_softmax, "softmax", "log_softmax")(softmax_rule)
