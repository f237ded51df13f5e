"""Registry entries for channel-wise, element-wise, normalisation and channel-mixing ops.

Each entry is a channel rule (see ``registry``) plus, where the op holds channel-sized
parameters or constants, a surgery rule from ``surgery_rules``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import surgery_rules as S
from .atoms import NONE, UNKNOWN, along, carrying_axes, filled, fixed, on_axis
from .flow_types import Balance, ChannelCount
from .registry import SmallTail, ZeroBelow, node_arg, register, register_name

# ----------------------------------------------------------------------------- per element

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Threshold,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity,
)
ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink,
    F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.sign,
    torch.erf, torch.sin, torch.cos, torch.reciprocal, torch.nan_to_num, torch.pow,
    F.sigmoid, F.tanh, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.rand_like, torch.randn_like, operator.neg, operator.pos, torch.detach, torch.clone,
)
ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt",
    "rsqrt", "square", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "sign", "erf", "pow",
    "reciprocal", "contiguous", "clone", "detach", "to", "type", "float", "double", "half",
    "bfloat16", "type_as", "requires_grad_", "zero_", "fill_", "hardswish", "sin", "cos",
    "nan_to_num",
)


def same_rule(ctx, node):
    """Per-element ops: the layout of the first argument passes through (tensor
    arguments beside it, such as per-channel clamp bounds, are unified with it)."""
    if len(node.all_input_nodes) > 1:
        return broadcast_rule(ctx, node)
    return ctx.layout(node.args[0]) if node.args else ctx.layout(node.kwargs.get("input"))


for _targets in (ACTIVATION_MODULES, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS):
    register(*_targets)(same_rule)


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


# Dead regions, read by SCP: exact zeros use their edge, smooth tails solve |f(t)| = delta.
_ZERO = ZeroBelow(0.0)
_HARD = ZeroBelow(-3.0)
_SIGMOID = SmallTail("sigmoid", lambda: torch.sigmoid)
DEAD_REGIONS = {
    **dict.fromkeys((nn.ReLU, nn.ReLU6, F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, "relu", "relu_"), _ZERO),
    **dict.fromkeys((nn.Hardswish, F.hardswish, nn.Hardsigmoid, F.hardsigmoid, "hardswish"), _HARD),
    **dict.fromkeys((nn.SiLU, F.silu), SmallTail("silu", lambda: F.silu)),
    **dict.fromkeys((nn.Mish, F.mish), SmallTail("mish", lambda: F.mish)),
    **dict.fromkeys((nn.GELU, F.gelu), SmallTail("gelu", lambda a: lambda y: F.gelu(y, approximate=a), _gelu_params)),
    **dict.fromkeys((nn.Softplus, F.softplus), SmallTail("softplus", lambda b, th: lambda y: F.softplus(y, b, th),
                                                          _softplus_params)),
    **dict.fromkeys((nn.Sigmoid, F.sigmoid, torch.sigmoid, torch.special.expit, "sigmoid", "sigmoid_"), _SIGMOID),
}
for _target, _dead in DEAD_REGIONS.items():
    register(_target, dead=_dead)(same_rule)
# torchvision's stochastic depth: identity in eval, a per-sample (N,1,1,1) scale in training
register_name("torchvision.ops.stochastic_depth.stochastic_depth", same_rule)
# PReLU with one weight per channel is a norm-like op: registered below.


def broadcast_rule(ctx, node):
    """n-ary element-wise ops: operands unify position by position; an operand broadcast
    across another's channels (a (N,1,H,W) map) unifies nothing and freezes its own atoms."""
    out = ctx.out()
    counts = [c for c in map(ctx.layout, list(node.args) + list(node.kwargs.values())) if isinstance(c, ChannelCount)]
    if not isinstance(out, torch.Tensor):  # arithmetic on sizes: the result still derives from them
        return ChannelCount(np.concatenate([c.atoms for c in counts])) if counts else None
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
        operands.append((lay, spread if not is_param else spread + [-1]))
    carrying = {d for lay, _ in operands for d in carrying_axes(lay)}
    kept = []
    for lay, spread in operands:
        if any(d in carrying for d in spread):
            ctx.freeze(lay, f"broadcast across channels at node {node.name}")
            continue
        kept.append((lay, spread))
    if not kept:
        return filled(NONE, nd)
    bearing = [lay for lay, _ in kept if (lay >= 0).any()]
    if len(bearing) > 1:
        gate = any(spread and -1 not in spread and (lay >= 0).any() for lay, spread in kept)
        scale = any(-1 in spread for lay, spread in kept)
        ctx.table.tag(bearing[0], "se" if gate and _is_mul(node) else "scale" if scale else "residual")
    return ctx.unify(*[lay for lay, _ in kept])


def _is_mul(node) -> bool:
    return node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")


register(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.addcmul, torch.lerp,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__",
)(broadcast_rule)

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
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool2d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear, torch.max_pool2d, torch.avg_pool1d,
)


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


register(*SPATIAL_MODULES, *SPATIAL_FUNCTIONS)(spatial_rule)

# ----------------------------------------------------------------------------- norms


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
        if ctx.flow.allow_inexact:
                ctx.constrain(Balance(atoms, m.num_groups, f"GroupNorm {node.target}"))
        ctx.inexact(atoms, f"GroupNorm with {m.num_groups} groups of {m.num_channels // m.num_groups} channels")
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return lay
    if has_state:
        atoms = ctx.unify(fixed(atoms), ctx.owned(v.shape[1], "norm"))
        ctx.table.tag(atoms, "norm")
    return on_axis(atoms, 1, v.dim())


register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.PReLU,
         surgery=S.norm_surgery)(norm_rule)


@register(F.batch_norm, F.instance_norm)
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


@register(nn.LayerNorm, F.layer_norm, surgery=S.layer_norm_surgery)
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


@register(F.group_norm)
def functional_group_norm_rule(ctx, node):
    """Functional GroupNorm: per element when channels are not involved, else frozen."""
    lay = ctx.layout(node.args[0])
    if lay is not None and carrying_axes(lay):
        return ctx.unknown(f"{ctx.where()}: normalisation statistics over channels")
    return lay


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

# ----------------------------------------------------------------------------- structure


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
        if vec is not None and (vec >= 0).all() and len(np.unique(vec)) == len(vec):
            return ChannelCount(vec)
        return ChannelCount(np.unique(lay[lay >= 0]))
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
        return ChannelCount(np.unique(lay[lay >= 0]))
    return None


@register("dim", len, "element_size", "is_contiguous")
def no_channels_rule(ctx, node):
    """Ranks, dtypes and other Python values carry no channels."""
    return None
