"""One test per element-wise registry key (passes/ops/elementwise.py)."""
import operator

import pytest
import torch
import torch.nn.functional as F
from harness import case_ids, check
from torch import nn


def mod(key, *args, wrap=None, **kw):
    """A module case: ``key(*args)`` applied to a's output (``wrap`` reshapes it first)."""
    pre = wrap or (lambda x: x)
    return key, (lambda s, x: s.m(pre(x))), key(*args, **kw)


def fn(key, call):
    return key, call, None


def pos(x):
    return x.abs() + 0.5


def flat3(x):
    return x.flatten(2)


def deep5(x):
    return x.unsqueeze(2)


CASES = [
    mod(nn.ReLU), mod(nn.ReLU6), mod(nn.LeakyReLU), mod(nn.ELU), mod(nn.SELU), mod(nn.CELU), mod(nn.GELU),
    mod(nn.SiLU), mod(nn.Mish), mod(nn.Sigmoid), mod(nn.Tanh), mod(nn.Hardswish), mod(nn.Hardsigmoid),
    mod(nn.Hardtanh), mod(nn.Softplus), mod(nn.Softsign), mod(nn.Tanhshrink), mod(nn.Hardshrink),
    mod(nn.Softshrink), mod(nn.LogSigmoid), mod(nn.Threshold, 0.1, 0.0), mod(nn.Dropout),
    mod(nn.Dropout1d, wrap=flat3), mod(nn.Dropout2d), mod(nn.Dropout3d, wrap=deep5), mod(nn.AlphaDropout),
    mod(nn.FeatureAlphaDropout), mod(nn.Identity),
    fn(F.relu, lambda s, x: F.relu(x)), fn(torch.relu_, lambda s, x: torch.relu_(x)),
    fn(F.relu6, lambda s, x: F.relu6(x)), fn(F.leaky_relu, lambda s, x: F.leaky_relu(x, 0.1)),
    fn(F.elu, lambda s, x: F.elu(x)), fn(F.selu, lambda s, x: F.selu(x)), fn(F.celu, lambda s, x: F.celu(x)),
    fn(F.gelu, lambda s, x: F.gelu(x, approximate="tanh")), fn(F.silu, lambda s, x: F.silu(x)),
    fn(F.mish, lambda s, x: F.mish(x)), fn(F.hardswish, lambda s, x: F.hardswish(x)),
    fn(F.hardsigmoid, lambda s, x: F.hardsigmoid(x)), fn(F.hardtanh, lambda s, x: F.hardtanh(x)),
    fn(F.softplus, lambda s, x: F.softplus(x, 2.0)), fn(F.softsign, lambda s, x: F.softsign(x)),
    fn(F.tanhshrink, lambda s, x: F.tanhshrink(x)), fn(F.logsigmoid, lambda s, x: F.logsigmoid(x)),
    fn(F.dropout, lambda s, x: F.dropout(x, 0.5, False)),
    fn(F.dropout1d, lambda s, x: F.dropout1d(x.flatten(2), 0.5, False)),
    fn(F.dropout2d, lambda s, x: F.dropout2d(x, 0.5, False)),
    fn(F.dropout3d, lambda s, x: F.dropout3d(x.unsqueeze(2), 0.5, False)),
    fn(F.alpha_dropout, lambda s, x: F.alpha_dropout(x, 0.5, False)),
    fn(torch.relu, lambda s, x: torch.relu(x)), fn(torch.sigmoid, lambda s, x: torch.sigmoid(x)),
    fn(torch.tanh, lambda s, x: torch.tanh(x)), fn(torch.exp, lambda s, x: torch.exp(x)),
    fn(torch.log, lambda s, x: torch.log(pos(x))), fn(torch.abs, lambda s, x: torch.abs(x)),
    fn(torch.neg, lambda s, x: torch.neg(x)), fn(torch.sqrt, lambda s, x: torch.sqrt(pos(x))),
    fn(torch.rsqrt, lambda s, x: torch.rsqrt(pos(x))), fn(torch.square, lambda s, x: torch.square(x)),
    fn(torch.clamp, lambda s, x: torch.clamp(x, min=0.0)), fn(torch.clip, lambda s, x: torch.clip(x, -1, 1)),
    fn(torch.sign, lambda s, x: torch.sign(x) * x), fn(torch.erf, lambda s, x: torch.erf(x)),
    fn(torch.sin, lambda s, x: torch.sin(x)), fn(torch.cos, lambda s, x: torch.cos(x)),
    fn(torch.reciprocal, lambda s, x: torch.reciprocal(pos(x))),
    fn(torch.nan_to_num, lambda s, x: torch.nan_to_num(x)), fn(torch.pow, lambda s, x: torch.pow(x, 2)),
    fn(torch.zeros_like, lambda s, x: x + torch.zeros_like(x)), fn(torch.ones_like, lambda s, x: x * torch.ones_like(x)),
    fn(torch.full_like, lambda s, x: x * torch.full_like(x, 2.0)),
    fn(torch.empty_like, lambda s, x: x + torch.empty_like(x).zero_()),
    fn(torch.rand_like, lambda s, x: x + 0.0 * torch.rand_like(x)),
    fn(torch.randn_like, lambda s, x: x + 0.0 * torch.randn_like(x)),
    fn(operator.neg, lambda s, x: -x), fn(operator.pos, lambda s, x: +x),
    fn(torch.detach, lambda s, x: torch.detach(x)), fn(torch.clone, lambda s, x: torch.clone(x)),
    fn(torch.special.expit, lambda s, x: torch.special.expit(x)),
    # Tensor methods
    fn("relu", lambda s, x: x.relu()), fn("relu_", lambda s, x: x.relu_()), fn("sigmoid", lambda s, x: x.sigmoid()),
    fn("sigmoid_", lambda s, x: x.sigmoid_()), fn("tanh", lambda s, x: x.tanh()), fn("tanh_", lambda s, x: x.tanh_()),
    fn("exp", lambda s, x: x.exp()), fn("log", lambda s, x: (x * x + 1).log()), fn("abs", lambda s, x: x.abs()),
    fn("neg", lambda s, x: x.neg()), fn("sqrt", lambda s, x: (x * x + 1).sqrt()),
    fn("rsqrt", lambda s, x: (x * x + 1).rsqrt()), fn("square", lambda s, x: x.square()),
    fn("clamp", lambda s, x: x.clamp(-0.5, 0.5)), fn("clamp_", lambda s, x: x.clamp_(min=0)),
    fn("clip", lambda s, x: x.clip(-1, 1)), fn("clamp_min", lambda s, x: x.clamp_min(0)),
    fn("clamp_max", lambda s, x: x.clamp_max(0)), fn("sign", lambda s, x: x.sign() * x),
    fn("erf", lambda s, x: x.erf()), fn("pow", lambda s, x: x.pow(2)),
    fn("reciprocal", lambda s, x: (x * x + 1).reciprocal()), fn("contiguous", lambda s, x: x.contiguous()),
    fn("clone", lambda s, x: x.clone()), fn("detach", lambda s, x: x.detach()),
    fn("to", lambda s, x: x.to(torch.float64)), fn("type", lambda s, x: x.type(torch.float64)),
    fn("float", lambda s, x: x.float().double()), fn("double", lambda s, x: x.double()),
    fn("half", lambda s, x: x.half().double()), fn("bfloat16", lambda s, x: x.bfloat16().double()),
    fn("type_as", lambda s, x: x.type_as(x)),
    fn("type_as", lambda s, x: x.type_as(x.mean((1, 2, 3)))), fn("to", lambda s, x: x.to(x.sum((2, 3)))), fn("requires_grad_", lambda s, x: x.detach().requires_grad_(False)),
    fn("zero_", lambda s, x: x + x.clone().zero_()), fn("fill_", lambda s, x: x * x.clone().fill_(2.0)),
    fn("sin", lambda s, x: x.sin()), fn("cos", lambda s, x: x.cos()),
    fn("nan_to_num", lambda s, x: x.nan_to_num()),
]


def _bin(key, call):
    return fn(key, call)


CASES += [
    _bin(operator.add, lambda s, x: x + x.relu()), _bin(operator.sub, lambda s, x: x - x.relu()),
    _bin(operator.mul, lambda s, x: x * x.mean((2, 3), keepdim=True).sigmoid()),  # an SE gate
    _bin(operator.truediv, lambda s, x: x / (x * x + 1)), _bin(operator.floordiv, lambda s, x: x // 0.25),
    _bin(operator.pow, lambda s, x: x ** 2),
    _bin(operator.gt, lambda s, x: (x > 0) * x), _bin(operator.lt, lambda s, x: (x < 0.1) * x),
    _bin(operator.ge, lambda s, x: (x >= 0) * x), _bin(operator.le, lambda s, x: (x <= 0) * x),
    _bin(operator.eq, lambda s, x: (x == 0) + x), _bin(operator.ne, lambda s, x: (x != 0) * x),
    _bin(torch.add, lambda s, x: torch.add(x, x.relu(), alpha=2)), _bin(torch.sub, lambda s, x: torch.sub(x, x.relu())),
    _bin(torch.subtract, lambda s, x: torch.subtract(x, 1.0)), _bin(torch.mul, lambda s, x: torch.mul(x, x)),
    _bin(torch.multiply, lambda s, x: torch.multiply(x, x.sigmoid())),
    _bin(torch.div, lambda s, x: torch.div(x, 2.0)), _bin(torch.true_divide, lambda s, x: torch.true_divide(x, 2.0)),
    _bin(torch.maximum, lambda s, x: torch.maximum(x, x.relu())), _bin(torch.minimum, lambda s, x: torch.minimum(x, -x)),
    _bin(torch.where, lambda s, x: torch.where(x > 0, x, 0.1 * x)),
    _bin(torch.addcmul, lambda s, x: torch.addcmul(x, x, x, value=0.5)),
    _bin(torch.lerp, lambda s, x: torch.lerp(x, x.relu(), 0.3)),
    _bin("add", lambda s, x: x.add(x.relu())), _bin("add_", lambda s, x: x.add_(1.0)),
    _bin("sub", lambda s, x: x.sub(1.0)), _bin("sub_", lambda s, x: x.sub_(1.0)),
    _bin("mul", lambda s, x: x.mul(x)), _bin("mul_", lambda s, x: x.mul_(2.0)),
    _bin("div", lambda s, x: x.div(2.0)), _bin("div_", lambda s, x: x.div_(2.0)),
    _bin("maximum", lambda s, x: x.maximum(-x)), _bin("minimum", lambda s, x: x.minimum(-x)),
    _bin(operator.add, lambda s, x: operator.iadd(x.relu(), x)),  # y += x traces to operator.add
]


def masked_attention(s, x):
    """Tokens viewed as 2 heads x 4 dims, with a padding mask made by ``x.new_zeros``."""
    t = x.flatten(2).transpose(1, 2).reshape(2, -1, 2, 4).transpose(1, 2)
    o = F.scaled_dot_product_attention(t, t, t, attn_mask=x.new_zeros((64, 64)))
    return o.transpose(1, 2).reshape(2, 64, 8).transpose(1, 2)


# fresh tensors from x.new_*: no channels; one sized like the channels is a fixed-size tensor
NEW_TENSORS = [
    ("new_zeros", masked_attention, True),
    ("new_full", lambda s, x: x + x.new_full((1, 1, 8, 8), 2.0), True),
    ("new_empty", lambda s, x: x + x.new_empty(()).fill_(1.0), True),
    ("new_tensor", lambda s, x: x * x.new_tensor(2.0), True),
    ("new_ones", lambda s, x: x * x.new_ones((1, 8, 1, 1)), "cannot follow"),
    ("new_zeros", lambda s, x: x + x.new_zeros(x.shape), "cannot follow"),
    # channels copied along space, then moved onto the channel axis: a fixed 8 there
    (operator.add, lambda s, x: x + x.mean((2, 3), keepdim=True).expand(-1, -1, 8, 8).transpose(1, 2),
     "fixed size on a channel axis"),
]



@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_elementwise_key(case):
    key, op, module = case
    check(key, op, True, module)


@pytest.mark.parametrize("case", NEW_TENSORS, ids=case_ids(NEW_TENSORS))
def test_new_tensor_key(case):
    key, op, expect = case
    check(key, op, expect)


class PosEmbed(nn.Module):
    """A ViT position embedding: one (1, tokens, C)-shaped parameter, varying on two axes."""

    def __init__(self, shape):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(shape))


@pytest.mark.parametrize("key, op, shape, expect", [
    (operator.add, lambda s, x: (x.flatten(2).transpose(1, 2) + s.m.pos).transpose(1, 2), (1, 64, 8), True),
    (operator.mul, lambda s, x: ((s.m.pos + x.flatten(2).transpose(1, 2)) * s.m.pos).transpose(1, 2), (1, 64, 8), True),
    (operator.mul, lambda s, x: x.flatten(2) * s.m.pos, (1, 8, 64), True),                  # C x tokens
    (operator.add, lambda s, x: x + s.m.pos, (8, 8, 8), True),                   # C x H x W: C owns
    (operator.add, lambda s, x: (x.view(2, 2, 4, 64) + s.m.pos).view(2, 8, 64), (2, 4, 64), "combined"),
])
def test_parameter_varying_on_several_axes(key, op, shape, expect):
    """The parameter owns atoms on the axis where the activation beside it carries channels,
    and surgery slices it there; where that axis is ambiguous it is UNKNOWN (frozen)."""
    check(key, op, expect, PosEmbed(shape))


def _rotary(s, x):
    """EVA-02's rotary table: (tokens, head_dim), broadcast across the heads but of a fixed
    size along head_dim, where q carries channels: q's channels keep their size."""
    n, c, h, w = x.shape
    q = x.view(n, 2, 4, h * w).transpose(2, 3)  # (N, heads, tokens, head_dim)
    table = x.new_ones(h * w, 4) * 0.5
    return (q * table).transpose(2, 3).reshape(n, c, h, w)


def test_a_table_broadcast_across_heads_but_fixed_along_head_dim_freezes_what_it_meets():
    check(operator.mul, _rotary, "combined at node mul")


def test_stochastic_depth_by_qualified_name():
    """register_name: torchvision's stochastic_depth, found by module and name (a stand-in
    with that qualified name, wrapped as a leaf as fx wraps the real one)."""
    check("torchvision.ops.stochastic_depth.stochastic_depth", lambda s, x: stochastic_depth(x, 0.2, "row", False))


def stochastic_depth(x, p, mode, training=True):
    return x


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")
