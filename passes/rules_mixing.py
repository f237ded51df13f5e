"""Registry entries for the ops that mix channels (mask sites): conv (dense, grouped,
depthwise, transposed), linear, their functional forms on plain parameters, and matmul.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import surgery_rules as S
from .atoms import NONE, UNKNOWN, along, filled, fixed, on_axis
from .flow_types import Balance, NonEmpty
from .registry import register


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


@register(*CONV_MODULES, surgery=S.conv_surgery)
def conv_rule(ctx, node):
    m = ctx.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv_like(ctx, node, node.target, node.args[0], m.in_channels, m.out_channels,
                     m.groups, transposed, m.weight.dim())


@register(nn.Linear, surgery=S.linear_surgery)
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


@register(F.conv1d, F.conv2d, F.conv3d, F.linear, surgery=S.functional_weight_surgery)
def functional_weight_rule(ctx, node):
    """``F.conv2d(x, self.weight, self.bias, ...)`` with plain parameters: the weight owns
    the output atoms, the bias is tied to them."""
    w = ctx.arg(1, "weight")
    b = ctx.arg(2, "bias")
    if not (hasattr(w, "op") and w.op == "get_attr") or (b is not None and getattr(b, "op", None) != "get_attr"):
        return ctx.unknown(f"{ctx.where()}: weight is computed, not a parameter")
    wv = ctx.val(w)
    if node.target is F.linear:
        out = linear_like(ctx, node, w.target, node.args[0], wv.shape[1], wv.shape[0])
        axis = -1
    else:
        groups = ctx.arg(6, "groups", 1)
        if groups != 1:
            return ctx.unknown(f"{ctx.where()}: grouped functional conv")
        out = conv_like(ctx, node, w.target, node.args[0], wv.shape[1], wv.shape[0], 1, False, wv.dim())
        axis = 1
    if b is not None:
        ctx.unify(along(out, axis, wv.shape[0]), along(ctx.layout(b), 0, wv.shape[0]))
    return out


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


@register(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
def matmul_rule(ctx, node):
    """``a @ b`` between activations: the contracted axes unify and are a mask site on
    ``a``; the output carries a's row atoms or b's column atoms (not both)."""
    a, b = node.args[0], node.args[1]
    la, lb, va, vb = ctx.layout(a), ctx.layout(b), ctx.val(a), ctx.val(b)
    if va.dim() < 2 or vb.dim() < 2 or getattr(b, "op", None) == "get_attr":
        return ctx.unknown()
    nd = ctx.out().dim()
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


