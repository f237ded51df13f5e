"""Ops that mix channels (mask sites): conv (dense, grouped, depthwise, transposed),
linear, their functional forms on parameters (grouped, depthwise, or a weight computed from
parameters only: passes/ops/params.py), and matmul; with their surgery,
fast shapes, FLOPs terms and one-shot importance.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atoms import NONE, UNKNOWN, along, carrying_axes, filled, fixed, known_grid, on_axis
from ..flow_types import Balance, NonEmpty
from ..registry import FlopsTerm, annotate, node_arg, register
from .params import adopt_params, erase_unused, evaluate, param_source, still_read
from .tensors import empty, idx, one_tensor, set_tensor, take

# ----------------------------------------------------------------------------- surgery


def slice_weight(w: torch.Tensor, groups: int, in_keep: np.ndarray, out_keep: np.ndarray):
    """A dense, depthwise or grouped conv weight cut to the kept channels: ``(weight, groups)``."""
    if groups == 1:
        return take(take(w, 0, out_keep), 1, in_keep), 1
    if groups == len(in_keep):  # depthwise, any channel multiplier
        return take(w, 0, out_keep), int(in_keep.sum())
    ip, op = len(in_keep) // groups, len(out_keep) // groups  # grouped: same count per group (Balance)
    rows = [w[idx(out_keep[b * op:(b + 1) * op]) + b * op][:, idx(in_keep[b * ip:(b + 1) * ip])]
            for b in range(groups)]
    return torch.cat(rows, 0), groups


def slice_conv(m: nn.Module, in_keep: np.ndarray, out_keep: np.ndarray) -> None:
    """Slice a (transposed, grouped, depthwise) conv's weight and bias in place."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        w, g = take(take(m.weight.data, 0, in_keep), 1, out_keep), m.groups
    else:
        w, g = slice_weight(m.weight.data, m.groups, in_keep, out_keep)
    set_tensor(m, "weight", w)
    if m.bias is not None:
        set_tensor(m, "bias", take(m.bias.data, 0, out_keep))
    m.in_channels, m.out_channels, m.groups = int(in_keep.sum()), int(out_keep.sum()), g


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
    ok, ik = sctx.keep_along(node, -1), sctx.site_keep(sctx.site_of(node))
    set_tensor(m, "weight", take(take(m.weight.data, 0, ok), 1, ik))
    if m.bias is not None:
        set_tensor(m, "bias", take(m.bias.data, 0, ok))
    m.in_features, m.out_features = int(ik.sum()), int(ok.sum())


def functional_weight_surgery(sctx, node):
    """``F.conv2d`` / ``F.linear`` on a parameter, or on a weight computed from parameters
    only (folded: evaluated once, sliced, stored in place of the raw parameter); grouped and
    depthwise convs re-emit their ``groups``. The bias is a one-axis parameter, sliced by the
    generic parameter pass."""
    w = node_arg(node, 1, "weight")
    src = param_source(w)
    if src is None or not sctx.first_call(node, key=("weight", src.target)):
        return
    linear = node.target is torch.nn.functional.linear
    axis = -1 if linear else 1
    site = sctx.site_of(node)  # none where the input carries no prunable channel (e.g. the image)
    in_keep = sctx.site_keep(site) if site is not None else sctx.keep_along(node_arg(node, 0, "input"), axis)
    out_keep = sctx.keep_along(node, axis)
    if out_keep.all() and in_keep.all():
        return  # nothing dropped
    owner, name = sctx.owner_of(src.target)
    value = getattr(owner, name).data if w is src else evaluate(sctx.gm, w)
    groups = 1 if linear else node_arg(node, 6, "groups", 1)
    if groups != 1:  # input channels of a grouped weight: groups x its dim 1
        in_keep = sctx.keep_along(node_arg(node, 0, "input"), 1) if site is None else in_keep
    sliced, new_groups = slice_weight(value, groups, in_keep, out_keep)
    set_tensor(owner, name, sliced)
    if new_groups != groups:
        _set_arg(node, 6, "groups", new_groups)
    if w is not src:  # the conv reads the folded weight; the computation is erased
        with sctx.graph.inserting_before(node):
            folded = sctx.graph.get_attr(src.target)
        folded.meta["val"] = w.meta["val"]
        node.replace_input_with(w, folded)
        for target in erase_unused(sctx.graph, w):
            if target != src.target and not still_read(sctx.gm, target):
                delattr(*sctx.owner_of(target))


def _set_arg(node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


# ----------------------------------------------------------------------------- FLOPs, importance, shapes


def _numel(shape) -> int:
    return int(math.prod(shape))


def conv_flops(node, modules, site, layout=None) -> FlopsTerm:
    """FlopCounterMode's conv count ``2 * spatial * Cin * Cout / groups * kernel`` as
    ``coef * I * O``; without a mask site (depthwise) it follows the outputs alone."""
    out, x = node.meta["val"], node_arg(node, 0, "input").meta["val"]
    if node.op == "call_module":
        m = modules[node.target]
        w, groups = m.weight, m.groups
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    else:
        w, groups, transposed = node_arg(node, 1, "weight").meta["val"], node_arg(node, 6, "groups", 1), False
    cin, cout = x.shape[1], out.shape[1]
    spatial = _numel(x.shape) // cin if transposed else _numel(out.shape) // cout
    flops = 2.0 * spatial * cin * cout // groups * _numel(w.shape[2:])
    return FlopsTerm(flops / (cin * cout), True, 1) if site is not None else FlopsTerm(flops / cout, False, 1)


def linear_flops(node, modules, site, layout=None) -> FlopsTerm:
    """``2 * rows * I * O``."""
    return FlopsTerm(2.0 * _numel(node.meta["val"].shape[:-1]), True, -1)


def functional_flops(node, modules, site, layout=None) -> FlopsTerm:
    return (linear_flops if node.target is F.linear else conv_flops)(node, modules, site, layout)


def matmul_flops(node, modules, site, layout=None) -> FlopsTerm | None:
    """``2 * numel(out) * K``: per kept K at the mask site, per kept output channel when the
    output carries channels (``attn @ v``); none when neither is pruned."""
    out = node.meta["val"].shape
    k = node_arg(node, 0, "input").meta["val"].shape[-1]
    axes = carrying_axes(layout) if isinstance(layout, np.ndarray) else []
    if site is None and not axes:
        return None
    coef = 2.0 * _numel(out) * (1 if site is not None else k)
    return FlopsTerm(coef / out[axes[0]], site is not None, axes[0]) if axes else FlopsTerm(coef, True, None)


def weight_l1(node, modules) -> np.ndarray | None:
    """L1 norm of the weight columns that read each input channel (dense conv, linear)."""
    m = modules[node.target]
    w = getattr(m, "weight", None)
    if w is None or getattr(m, "groups", 1) != 1 or isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None
    return w.detach().abs().reshape(w.shape[0], w.shape[1], -1).sum(dim=(0, 2)).double().numpy()


def conv_shape(m, args, kwargs):
    x = one_tensor(args, kwargs)
    nd = m.weight.dim() - 2
    if x is None or x.dtype != m.weight.dtype or x.dim() != nd + 2 or isinstance(m.padding, str):
        return None
    spatial = [(x.shape[2 + i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
               for i in range(nd)]
    return empty((x.shape[0], m.out_channels, *spatial), x)


def linear_shape(m, args, kwargs):
    x = one_tensor(args, kwargs)
    if x is None or x.dtype != m.weight.dtype or x.shape[-1] != m.in_features:
        return None
    return empty((*x.shape[:-1], m.out_features), x)


# ----------------------------------------------------------------------------- rules


def _input_atoms(ctx, x, axis: int, width: int) -> np.ndarray:
    lay = ctx.layout(x)
    atoms = along(lay, axis, width) if lay is not None else None
    if atoms is None:
        ctx.freeze(lay, f"{ctx.where()}: input channels on several axes")
        atoms = np.full(width, UNKNOWN, dtype=np.int64)
    return atoms


def _tie_inputs(ctx, key: str, atoms: np.ndarray) -> np.ndarray:
    """Shared weights read the same input channels at every call."""
    prev = ctx.flow.module_inputs.get(key)
    if prev is None:
        ctx.flow.module_inputs[key] = atoms
        return atoms
    return ctx.unify(prev, atoms)


def conv_like(ctx, node, key, x, cin, cout, groups, transposed, weight_dims):
    v = ctx.val(x)
    if v.dim() != weight_dims:
        return ctx.unknown(f"{ctx.where()}: unbatched input")
    atoms_in = _tie_inputs(ctx, key, _input_atoms(ctx, x, 1, cin))
    out_atoms = ctx.owned(cout, "conv", key)
    if groups == 1:
        site = ctx.site(0, atoms_in, 1, "conv")
    elif groups == cin and not transposed:
        ctx.unify(fixed(np.repeat(atoms_in, cout // cin)), out_atoms)
        ctx.table.tag(out_atoms, "depthwise")
        site = None
    elif transposed:
        return ctx.unknown(f"{ctx.where()}: grouped transposed conv")
    else:
        site = ctx.site(0, atoms_in, 1, "conv")
        ctx.constrain(Balance(atoms_in, groups, f"grouped conv {key} (input)", site))
        ctx.constrain(Balance(out_atoms, groups, f"grouped conv {key} (output)"))
        ctx.table.tag(np.concatenate([atoms_in, out_atoms]), "grouped")
        if cout == groups:
            ctx.freeze(out_atoms, f"grouped conv {key} has one output per group")
    if site is not None:
        ctx.constrain(NonEmpty(atoms_in, f"input of {key}", site))
    ctx.constrain(NonEmpty(out_atoms, f"output of {key}"))
    return on_axis(out_atoms, 1, v.dim())


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register(*CONV_MODULES, surgery=conv_surgery, flops=conv_flops, importance=weight_l1)
def conv_rule(ctx, node):
    m = ctx.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv_like(ctx, node, node.target, node.args[0], m.in_channels, m.out_channels,
                     m.groups, transposed, m.weight.dim())


@register(nn.Linear, surgery=linear_surgery, flops=linear_flops, importance=weight_l1)
def linear_rule(ctx, node):
    m = ctx.module
    return linear_like(ctx, node, node.target, node.args[0], m.in_features, m.out_features)


def linear_like(ctx, node, key, x, fin, fout):
    atoms_in = _tie_inputs(ctx, key, _input_atoms(ctx, x, -1, fin))
    site = ctx.site(0, atoms_in, ctx.val(x).dim() - 1, "linear")
    ctx.constrain(NonEmpty(atoms_in, f"input of {key}", site))
    out_atoms = ctx.owned(fout, "linear", key)
    ctx.constrain(NonEmpty(out_atoms, f"output of {key}"))
    return on_axis(out_atoms, -1, ctx.out().dim())


@register(F.conv1d, F.conv2d, F.conv3d, F.linear, surgery=functional_weight_surgery, flops=functional_flops)
def functional_weight_rule(ctx, node):
    """``F.conv2d(x, self.weight, self.bias, ...)`` with plain parameters: the weight owns
    the output atoms, the bias is tied to them."""
    w = ctx.arg(1, "weight")
    b = ctx.arg(2, "bias")
    src = param_source(w)  # the parameter itself, or the one a parameter-only computation reads
    if src is None:
        return ctx.unknown(f"{ctx.where()}: weight is computed, not a parameter")
    wv = ctx.val(w)
    if node.target is F.linear:
        out = linear_like(ctx, node, src.target, node.args[0], wv.shape[1], wv.shape[0])
        axis = -1
    else:
        groups = ctx.arg(6, "groups", 1)
        if not isinstance(groups, int):
            return ctx.unknown(f"{ctx.where()}: groups is not a constant")
        out = conv_like(ctx, node, src.target, node.args[0], wv.shape[1] * groups, wv.shape[0], groups, False,
                        wv.dim())
        axis = 1
    if b is not None:  # a parameter, or computed from some (BEiT's cat of q, zero k and v biases)
        ctx.unify(along(out, axis, wv.shape[0]), _bias_atoms(ctx, b, wv.shape[0]))
    if w is not src:
        adopt_params(ctx, w, src, along(out, axis, wv.shape[0]))
    return out


def _bias_atoms(ctx, b, n: int) -> np.ndarray:
    """The bias's atoms, one per output channel; UNKNOWN (so the outputs freeze) where the
    flow did not follow its computation to a 1-D vector of channels."""
    vec = along(ctx.layout(b), 0, n) if isinstance(ctx.layout(b), np.ndarray) else None
    return vec if vec is not None and ctx.val(b).dim() == 1 else np.full(n, UNKNOWN, dtype=np.int64)


def _contracted_atoms(lay: np.ndarray, axis: int, extent: int) -> np.ndarray:
    """Atoms along a matmul operand's contracted axis. A layout that varies only on another
    axis puts none there (NONE), and neither does a one-channel tensor on an axis of extent
    > 1 (GCNet: ``x @ softmax(conv_attn(x))`` contracts the spatial axis; the attention's
    single channel sits on an axis of extent 1). UNKNOWN stays UNKNOWN."""
    if lay.shape[axis] > 1:
        return np.broadcast_to(lay.reshape(-1), (extent,))
    value = lay.reshape(-1)[0]
    if lay.size > 1 or (value >= 0 and extent > 1):
        value = NONE
    return np.full(extent, value, dtype=np.int64)


def _over_heads(ctx, lay: np.ndarray, v) -> np.ndarray:
    """Channels on batch (head) axes and on one matrix axis, as ``q @ k.transpose(-2, -1)``
    with q of shape (batch, heads, tokens, dim): the dim's columns are unified across heads
    (the same positions in every head, as attention prunes), leaving one channel axis."""
    lay = lay.reshape((1,) * (v.dim() - lay.ndim) + lay.shape)
    axes = carrying_axes(lay)
    own = [d for d in axes if d >= v.dim() - 2]
    if len(own) == 1 and known_grid(lay):
        return on_axis(ctx.unify_columns(lay, own[0], v.shape[own[0]]), own[0], v.dim())
    return lay


@register(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", flops=matmul_flops)
def matmul_rule(ctx, node):
    """``a @ b`` between activations: the contracted axes unify and are a mask site on
    ``a``; the output carries a's row atoms or b's column atoms (not both)."""
    a, b = node.args[0], node.args[1]
    la, lb, va, vb = ctx.layout(a), ctx.layout(b), ctx.val(a), ctx.val(b)
    if va.dim() < 2 or vb.dim() < 2 or getattr(b, "op", None) == "get_attr":
        return ctx.unknown()
    nd = ctx.out().dim()
    la, lb = _over_heads(ctx, la, va), _over_heads(ctx, lb, vb)
    if any(s > 1 for s in la.shape[:-2]) or any(s > 1 for s in lb.shape[:-2]) or \
            (la.shape[-1] > 1 and la.shape[-2] > 1) or (lb.shape[-1] > 1 and lb.shape[-2] > 1) or \
            (la.shape[-2] > 1 and lb.shape[-1] > 1):
        return ctx.unknown(f"{ctx.where()}: operands carry channels on several axes")
    ka, kb = _contracted_atoms(la, -1, va.shape[-1]), _contracted_atoms(lb, -2, vb.shape[-2])
    for mine, other in ((ka, kb), (kb, ka)):  # a fixed contraction extent freezes the other side
        if (mine == NONE).all() and (other >= 0).any():
            ctx.freeze(other, f"{ctx.where()}: contracted with a tensor of fixed size")
    contracted = ctx.unify(ka.copy(), kb.copy())
    if (contracted >= 0).any():
        ctx.site(0, contracted, va.dim() - 1, "matmul")
    if la.shape[-2] > 1:
        return on_axis(la.reshape(-1), nd - 2, nd)
    if lb.shape[-1] > 1:
        return on_axis(lb.reshape(-1), nd - 1, nd)
    return filled(NONE, nd)


annotate(nn.Conv1d, nn.Conv2d, nn.Conv3d, shape=conv_shape)  # not transposed: another formula
annotate(nn.Linear, shape=linear_shape)
