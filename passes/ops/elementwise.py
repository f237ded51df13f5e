"""Element-wise ops: activations (with their dead regions, read by SCP), dropout and
identity, and n-ary arithmetic that unifies its operands position by position.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..atoms import NONE, UNKNOWN, carrying_axes, filled, fixed_extent
from ..flow_types import ChannelCount, ParamRef
from ..registry import SmallTail, ZeroBelow, annotate, node_arg, register, register_name
from .tensors import empty, same_shape_function, same_shape_module

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Threshold,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity,
)
# PReLU with one weight per channel is a norm-like op: norm.py registers it. F.sigmoid and
# F.tanh are absent: they call x.sigmoid() / x.tanh() without a torch-function check, so
# fx records the method.
ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink,
    F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.sign,
    torch.erf, torch.sin, torch.cos, torch.reciprocal, torch.nan_to_num, torch.pow,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.rand_like, torch.randn_like, operator.neg, operator.pos, torch.detach, torch.clone,
    torch.special.expit,
)
ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt",
    "rsqrt", "square", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "sign", "erf", "pow",
    "reciprocal", "contiguous", "clone", "detach", "type", "float", "double", "half",
    "bfloat16", "requires_grad_", "zero_", "fill_", "sin", "cos",
    "nan_to_num",
)


def same_rule(ctx, node):
    """Per-element ops: the layout of the first argument passes through (tensor
    arguments beside it, such as per-channel clamp bounds, are unified with it)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(x, (tuple, list)):  # nn.Identity over a structure: each item's layout passes
        return type(x)(ctx.layout(item) for item in x)
    if len(node.all_input_nodes) > 1:
        return broadcast_rule(ctx, node)
    return ctx.layout(x)


register(*ACTIVATION_MODULES, *ACTIVATION_FUNCTIONS, *ACTIVATION_METHODS, chain="pass")(same_rule)

# torchvision's stochastic depth: identity in eval, a per-sample (N,1,1,1) scale in training
register_name("torchvision.ops.stochastic_depth.stochastic_depth", same_rule, chain="pass")
annotate(nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
         nn.Identity, nn.Dropout, nn.LeakyReLU, nn.ELU, nn.Mish, shape=same_shape_module)
annotate(F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, torch.sigmoid, shape=same_shape_function)

# ----------------------------------------------------------------------------- dead regions


def _number_args(*values):
    """A hashable tuple of plain numbers/strings, or None if one is only known at run time."""
    return None if any(isinstance(v, fx.Node) for v in values) else tuple(values)


def _gelu_params(module, node):
    return _number_args(module.approximate if module is not None
                        else node_arg(node, 1, "approximate", "none") if node is not None else "none")


def _softplus_params(module, node):
    if module is not None:
        return _number_args(float(module.beta), float(module.threshold))
    if node is None:
        return (1.0, 20.0)
    return _number_args(node_arg(node, 1, "beta", 1.0), node_arg(node, 2, "threshold", 20.0))


# Exact zeros use their edge; smooth tails solve |f(t)| = delta (registry.solve_tail).
_ZERO = ZeroBelow(0.0)
_HARD = ZeroBelow(-3.0)
_SIGMOID = SmallTail("sigmoid", lambda: torch.sigmoid)
DEAD_REGIONS = {
    **dict.fromkeys((nn.ReLU, nn.ReLU6, F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, "relu", "relu_"), _ZERO),
    **dict.fromkeys((nn.Hardswish, F.hardswish, nn.Hardsigmoid, F.hardsigmoid), _HARD),
    **dict.fromkeys((nn.SiLU, F.silu), SmallTail("silu", lambda: F.silu)),
    **dict.fromkeys((nn.Mish, F.mish), SmallTail("mish", lambda: F.mish)),
    **dict.fromkeys((nn.GELU, F.gelu), SmallTail("gelu", lambda a: lambda y: F.gelu(y, approximate=a), _gelu_params)),
    **dict.fromkeys((nn.Softplus, F.softplus), SmallTail("softplus", lambda b, th: lambda y: F.softplus(y, b, th),
                                                          _softplus_params)),
    **dict.fromkeys((nn.Sigmoid, torch.sigmoid, torch.special.expit, "sigmoid", "sigmoid_"), _SIGMOID),
}
for _target, _dead in DEAD_REGIONS.items():
    annotate(_target, dead=_dead)

# ----------------------------------------------------------------------------- casts, new tensors


@register("to", "type_as", chain="pass")
def cast_rule(ctx, node):
    """``x.to(other)`` / ``x.type_as(other)``: ``other`` lends its dtype and device, not its
    values, so only ``x``'s layout passes (YOLO's anchors cast like a feature map)."""
    return ctx.layout(node.args[0])


@register("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def new_tensor_rule(ctx, node):
    """``x.new_zeros(size)`` and friends (an attention mask): a fresh tensor that takes only
    ``x``'s dtype and device, so it carries no channels; a channel count among its sizes is
    frozen, since the new tensor's extent would then follow pruning unseen."""
    for a in node.all_input_nodes[1:]:
        if isinstance(ctx.layout(a), ChannelCount):
            ctx.freeze(ctx.layout(a), f"{ctx.where()}: a channel count sizes a new tensor")
    return filled(NONE, ctx.out().dim())


# ----------------------------------------------------------------------------- n-ary


def _items(ctx, a) -> tuple:
    """The per-item layouts of a tuple of sizes (None for constants)."""
    lay = ctx.flow.layouts.get(a) if isinstance(a, fx.Node) else None
    n = len(ctx.val(a)) if isinstance(a, fx.Node) else len(a)
    return tuple(lay) if isinstance(lay, tuple) and len(lay) == n else (None,) * n


def _place_params(ctx, args: list) -> None:
    """Parameters read here for the first time find their channel axis among the axes on
    which the activations beside them carry channels (``x + pos_embed``)."""
    params = [a for a in args if isinstance(a, fx.Node) and isinstance(ctx.flow.layouts.get(a), ParamRef)]
    if not params:
        return
    axes = set()
    for a in args:
        lay = ctx.layout(a) if isinstance(a, fx.Node) and a not in params else None
        if isinstance(lay, np.ndarray):
            axes.update(d - lay.ndim for d in carrying_axes(lay))
    for p in params:
        ctx.param_layout(ctx.flow.layouts[p], axes)


def broadcast_rule(ctx, node):
    """n-ary element-wise ops: operands unify position by position; an operand broadcast
    across another's channels (a (N,1,H,W) map) unifies nothing and freezes its own atoms."""
    out = ctx.out()
    _place_params(ctx, list(node.args) + list(node.kwargs.values()))
    counts = [c for c in map(ctx.layout, list(node.args) + list(node.kwargs.values())) if isinstance(c, ChannelCount)]
    if isinstance(out, tuple) and node.target is operator.add:  # sizes joined: x.size()[:-2] + (c,)
        return sum((_items(ctx, a) for a in node.args), ())
    if not isinstance(out, torch.Tensor):  # arithmetic on sizes: the result still derives from them
        if not counts:
            return None
        other = [a for a in node.all_input_nodes if not isinstance(ctx.layout(a), ChannelCount)]
        return ChannelCount(np.concatenate([c.atoms for c in counts]), pure=not other and all(c.pure for c in counts))
    for c in counts:
        ctx.freeze(c.atoms, f"the channel count is used as a number at node {node.name}")
    nd = out.dim()
    operands = []
    for a in list(node.args) + list(node.kwargs.values()):
        lay = ctx.layout(a)
        if isinstance(lay, ChannelCount):
            lay = filled(NONE, 0)
        if lay is None:
            continue
        v = ctx.val(a)
        vshape = (1,) * (nd - v.dim()) + tuple(v.shape) if isinstance(v, torch.Tensor) else (1,) * nd
        lay = lay.reshape((1,) * (nd - lay.ndim) + lay.shape)
        spread = [d for d in range(nd) if vshape[d] == 1 and out.shape[d] > 1]
        if (lay == NONE).all() and any(vshape[d] == out.shape[d] > 1 for d in range(nd)):
            lay = filled(UNKNOWN, nd)  # a fixed-size tensor: whatever it meets must keep its size
        is_param = isinstance(a, fx.Node) and a.op == "get_attr"
        operands.append((lay, spread if not is_param else spread + [-1], vshape))
    carrying = {d for lay, _, _ in operands for d in carrying_axes(lay)}
    kept = []
    for lay, spread, vshape in operands:
        if any(d in carrying for d in spread):
            ctx.freeze(lay, f"broadcast across channels at node {node.name}")
            if fixed_extent(lay, vshape, carrying - set(spread)):  # EVA-02's rotary table: across the heads,
                kept.append((filled(UNKNOWN, nd), spread))  # but fixed along head_dim: what it meets keeps its size
            continue
        if fixed_extent(lay, vshape, carrying):
            ctx.freeze(lay, f"{ctx.where()}: fixed size on a channel axis")
            lay = filled(UNKNOWN, nd)  # so the channels it meets are frozen too
        kept.append((lay, spread))
    if not kept:
        return filled(NONE, nd)
    bearing = [lay for lay, _ in kept if (lay >= 0).any()]
    if len(bearing) > 1:
        gate = any(spread and -1 not in spread and (lay >= 0).any() for lay, spread in kept)
        scale = any(-1 in spread for lay, spread in kept)
        ctx.table.tag(bearing[0], "se" if gate and _is_mul(node) else "scale" if scale else "residual")
    return ctx.unify(*[lay for lay, _ in kept])


MULS = (operator.mul, torch.mul, torch.multiply, "mul", "mul_")


def _is_mul(node) -> bool:
    return node.target in MULS


def binary_shape(target, args, kwargs):
    """Fast shape of ``a + b`` / ``a * b`` on two tensors of one dtype: the broadcast shape."""
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype:
        try:
            return empty(torch.broadcast_shapes(a.shape, b.shape), a)
        except RuntimeError:
            return None
    return None


# In-place operators (``y += x``) and dunder calls (``x.__add__(y)``) trace to operator.add
# and friends: fx proxies have no __iadd__, so those need no entries of their own.
register(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.addcmul, torch.lerp,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
)(broadcast_rule)
annotate(operator.add, operator.mul, shape=binary_shape)
annotate(operator.add, torch.add, "add", "add_", bn="through")  # BN -> add -> ReLU
