"""One test per registry key of the norm (passes/ops/norm.py), mixing
(passes/ops/mixing.py, passes/ops/einsum.py) and attention (passes/ops/attention.py) families."""
import operator

import pytest
import torch
import torch.nn.functional as F
from harness import case_ids, check
from opaque import opaque
from torch import nn

torch.fx.wrap("opaque")


def cl(f):
    """Run ``f`` channels-last and come back (LayerNorm / Linear over the channel axis)."""
    return lambda s, x: f(s, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def deep(x):
    return torch.stack([x, x * 2], 2)  # (N, C, 2, H, W)


def attention(mm):
    def op(s, x):
        n, c, h, w = x.shape
        q, k = x.flatten(2).transpose(1, 2), x.flatten(2)
        att = torch.softmax(mm(q, k) / 8.0, dim=-1)
        return x + (att @ q).transpose(1, 2).reshape(n, c, h, w) * 0.1
    return op


def einsum_attention(s, x):
    """Tokens as 2 heads x 4 dims: the dim contracted in the scores, carried by the values."""
    n, c = x.shape[:2]
    t = x.flatten(2).transpose(1, 2).reshape(n, -1, 2, c // 2)
    att = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", t, t * 0.5), dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", att, t).reshape(n, -1, c).transpose(1, 2)


def sdpa(**kw):
    """Tokens (N, HW, 8) viewed as 2 heads x 4 dims; q = k = v; back to (N, 8, HW)."""
    def op(s, x):
        n, c = x.shape[:2]
        t = x.flatten(2).transpose(1, 2).reshape(n, -1, 2, c // 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(t, t * 0.5, t, **kw)
        return o.transpose(1, 2).reshape(n, -1, c).transpose(1, 2)
    return op


def sdpa_over_channels(s, x):
    """Channels on the sequence axis (cross-covariance attention): not followed."""
    t = x.flatten(2)
    return F.scaled_dot_product_attention(t, t, t)


M = lambda s, x: s.m(x)  # noqa: E731
CASES = [
    # norm family
    (nn.BatchNorm1d, lambda s, x: s.m(x.flatten(2)), nn.BatchNorm1d(8), True),
    (nn.BatchNorm2d, M, nn.BatchNorm2d(8), True),
    (nn.BatchNorm3d, lambda s, x: s.m(deep(x)), nn.BatchNorm3d(8), True),
    (nn.SyncBatchNorm, M, nn.SyncBatchNorm(8), True),
    (nn.InstanceNorm1d, lambda s, x: s.m(x.flatten(2)), nn.InstanceNorm1d(8, affine=True), True),
    (nn.InstanceNorm2d, M, nn.InstanceNorm2d(8, affine=True), True),
    (nn.InstanceNorm3d, lambda s, x: s.m(deep(x)), nn.InstanceNorm3d(8, affine=True), True),
    (nn.GroupNorm, M, nn.GroupNorm(8, 8), True),
    (nn.GroupNorm, M, nn.GroupNorm(2, 8), True),   # made exact: a mask site, balanced per group
    (nn.GroupNorm, M, nn.GroupNorm(1, 8), True),
    (nn.PReLU, M, nn.PReLU(8), True),
    (F.batch_norm, lambda s, x: F.batch_norm(x, s.m.running_mean, s.m.running_var, s.m.weight, s.m.bias),
     nn.BatchNorm2d(8), True),
    (F.instance_norm, lambda s, x: F.instance_norm(x), None, True),
    (nn.LocalResponseNorm, M, nn.LocalResponseNorm(2), "inexact: LocalResponseNorm"),
    (F.local_response_norm, lambda s, x: F.local_response_norm(x, 2), None, "inexact: LocalResponseNorm"),
    (nn.LayerNorm, cl(M), nn.LayerNorm(8), True),
    (F.layer_norm, cl(lambda s, x: F.layer_norm(x, (8,))), None, True),
    (F.group_norm, lambda s, x: F.group_norm(x, 2), None, True),   # exact, as nn.GroupNorm
    (F.group_norm, lambda s, x: F.group_norm(x, 8, s.m.weight, s.m.bias), nn.GroupNorm(8, 8), True),
    (F.group_norm, lambda s, x: F.group_norm(x.flatten(2).transpose(1, 2), 2), None,
     "normalisation statistics over channels"),
    (nn.Softmax, M, nn.Softmax(dim=-1), True),
    (nn.Softmax, M, nn.Softmax(dim=1), "inexact"),
    (nn.Softmax2d, M, nn.Softmax2d(), "inexact"),
    (nn.LogSoftmax, M, nn.LogSoftmax(dim=-1), True),
    (F.softmax, lambda s, x: F.softmax(x, -1), None, True),
    (F.log_softmax, lambda s, x: F.log_softmax(x, 1), None, "inexact"),
    (torch.softmax, lambda s, x: torch.softmax(x, -1), None, True),
    (torch.log_softmax, lambda s, x: torch.log_softmax(x, -1), None, True),
    ("softmax", lambda s, x: x.softmax(-1), None, True),
    ("log_softmax", lambda s, x: x.log_softmax(-2), None, True),
    # mixing family
    (nn.Conv1d, lambda s, x: s.m(x.flatten(2)), nn.Conv1d(8, 6, 3), True),
    (nn.Conv2d, M, nn.Conv2d(8, 6, 3, padding=1), True),
    (nn.Conv2d, M, nn.Conv2d(8, 8, 3, groups=8), True),          # depthwise
    (nn.Conv2d, M, nn.Conv2d(8, 4, 1, groups=2), True),          # grouped: Balance
    (nn.Conv3d, lambda s, x: s.m(deep(x)), nn.Conv3d(8, 6, 1), True),
    (nn.ConvTranspose1d, lambda s, x: s.m(x.flatten(2)), nn.ConvTranspose1d(8, 6, 2), True),
    (nn.ConvTranspose2d, M, nn.ConvTranspose2d(8, 6, 2, stride=2), True),
    (nn.ConvTranspose3d, lambda s, x: s.m(deep(x)), nn.ConvTranspose3d(8, 6, 1), True),
    (nn.Linear, cl(M), nn.Linear(8, 6), True),
    (F.conv1d, lambda s, x: F.conv1d(x.flatten(2), s.m.weight, s.m.bias), nn.Conv1d(8, 6, 1), True),
    (F.conv2d, lambda s, x: F.conv2d(x, s.m.weight, s.m.bias, padding=1), nn.Conv2d(8, 6, 3), True),
    (F.conv3d, lambda s, x: F.conv3d(deep(x), s.m.weight), nn.Conv3d(8, 6, 1), True),
    (F.linear, cl(lambda s, x: F.linear(x, s.m.weight, s.m.bias)), nn.Linear(8, 6), True),
    (torch.matmul, attention(torch.matmul), None, True),
    (operator.matmul, attention(operator.matmul), None, True),
    ("matmul", attention(lambda a, b: a.matmul(b)), None, True),
    (torch.bmm, attention(torch.bmm), None, True),
    ("bmm", attention(lambda a, b: a.bmm(b)), None, True),
    (torch.einsum, einsum_attention, None, True),
    (torch.einsum, lambda s, x: torch.einsum("...chw,c->...chw", x, s.m.weight), nn.BatchNorm2d(8), True),
    (torch.einsum, lambda s, x: torch.einsum("bchw,bc->bhw", x, x.mean((2, 3))).unsqueeze(1) * x, None, True),
    (torch.einsum, lambda s, x: x + torch.einsum("bchw->bhwc", x).permute(0, 3, 1, 2), None, True),
    (torch.einsum, lambda s, x: torch.einsum("bccw->bcw", x), None, "repeated letters"),
    (torch.einsum, lambda s, x: torch.einsum("bchw,bdhw->bcd", x, x).flatten(1, 2), None, "several letters"),
    # attention family: the head dim, per column in every head, with the scale written out
    (F.scaled_dot_product_attention, sdpa(), None, True),
    (F.scaled_dot_product_attention, sdpa(scale=0.3, is_causal=True), None, True),
    (F.scaled_dot_product_attention, sdpa_over_channels, None, "head and feature axes only"),
]



@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_norm_mixing_key(case):
    key, op, module, expect = case
    check(key, op, expect, module)


class CatBias(nn.Module):
    """timm BEiT's attention projection: the bias is computed, a cat of a q bias, a zero
    buffer for k and a v bias."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.register_buffer("k_bias", torch.zeros(2), persistent=False)

    def bias(self):
        return torch.cat((self.q_bias, self.k_bias, self.v_bias))


def test_linear_with_a_computed_bias():
    """The bias's pieces are sliced with the outputs (a tiled piece with every copy of its
    channels); where the flow cannot follow the bias's computation (an op with no rule)
    the outputs are frozen."""
    def outputs(cg):
        return next(g for g in cg.groups if "m.weight" in g.producers)
    assert outputs(check(F.linear, cl(lambda s, x: F.linear(x, s.m.weight, s.m.bias())), True, CatBias())).prunable
    cg = check(F.linear, cl(lambda s, x: F.linear(x, s.m.weight, s.m.q_bias.repeat(3))), True, CatBias())
    assert outputs(cg).prunable and outputs(cg).width == 2  # six outputs: three copies of q_bias's two
    cg = check(F.linear, cl(lambda s, x: F.linear(x, s.m.weight, opaque(s.m.q_bias.repeat(3).view(1, 6)).view(6))), True,
               CatBias())
    assert not outputs(cg).prunable
