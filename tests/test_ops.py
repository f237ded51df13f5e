"""One small model per op family the zoo does not cover: the invariant holds where the op
has a rule, and the channels it touches are frozen (with the reason) where it has none."""
import pytest
import torch
import torch.nn.functional as F
from conftest import outputs, random_drop, rel_err
from opaque import opaque
from torch import nn

import softprune_fx as sp

torch.fx.wrap("opaque")  # this module's name for the op with no rule


class Net(nn.Module):
    """conv a (3 -> 8) -> op -> conv b; ``op`` is the function under test."""

    def __init__(self, op, mid=8, out_in=None):
        super().__init__()
        self.a = nn.Conv2d(3, mid, 3, padding=1)
        self.op = op
        self.b = nn.LazyConv2d(4, 1) if out_in is None else nn.Conv2d(out_in, 4, 1)

    def forward(self, x):
        return self.b(self.op(self, self.a(x)))


def attention(self, x, scale=None):
    n, c, h, w = x.shape
    q = x.flatten(2).transpose(1, 2)          # (N, HW, C)
    k = x.flatten(2)                           # (N, C, HW)
    att = torch.softmax(q @ k / (8.0 if scale is None else scale), dim=-1)   # contracted: a site
    return x + (att @ q).transpose(1, 2).reshape(n, c, h, w) * 0.1


CASES = {
    # name: (op, prunable "a"?, expected reason fragment when frozen)
    "matmul": (attention, True, None),
    "channel_count_as_number": (lambda s, x: attention(s, x, scale=x.shape[1]), False, "channel count"),
    "expand_channel_count": (lambda s, x: x.mean(1, keepdim=True).expand(-1, x.size(1), -1, -1) * x, True, None),
    "stack_mean": (lambda s, x: torch.stack([x, x * 2], 0).mean(0), True, None),
    "tensor_split": (lambda s, x: torch.cat(torch.tensor_split(x, [3, 5], dim=1)[::-1], 1), True, None),
    "unflatten_movedim": (lambda s, x: x.flatten(2).unflatten(2, (x.shape[2], x.shape[3])).movedim(1, -1)
                          .movedim(-1, 1), True, None),
    "view_constant": (lambda s, x: x.view(x.shape[0], 8, 16, 16).relu(), True, None),
    "instance_norm": (lambda s, x: F.instance_norm(x), True, None),
    "max_values": (lambda s, x: x * torch.max(x, dim=1, keepdim=True)[0], True, None),
    "max_indices": (lambda s, x: x * torch.max(x, dim=1, keepdim=True)[1].float(), False, "arg-max"),
    "softmax_channels": (lambda s, x: torch.softmax(x, 1), False, "inexact"),
    "lrn": (lambda s, x: F.local_response_norm(x, 2), False, "inexact"),
    "std_channels": (lambda s, x: x / x.std(1, keepdim=True), False, "inexact"),
    "reflect_pad_channels": (lambda s, x: F.pad(x.unsqueeze(0), (0, 0, 0, 0, 1, 1), mode="reflect")[0],
                             False, "pads the channel axis"),
    "index_select": (lambda s, x: x.index_select(1, torch.tensor([0, 2, 4])), False, "no rule"),
    "unbind": (lambda s, x: x.unbind(1)[0].unsqueeze(1) + x, False, "unbinds"),
    "expand_as": (lambda s, x: x.mean(1, keepdim=True).expand_as(x) + x, True, None),
    "opaque": (lambda s, x: opaque(x), False, "no rule for opaque.opaque"),
    # Swin: a channels-last LayerNorm (rewritten exactly) read directly by a spatial pad
    "layer_norm_then_pad": (lambda s, x: F.pad(F.layer_norm(x.permute(0, 2, 3, 1), (8,)), (0, 0, 0, 1, 0, 1))
                            [:, :16, :16].permute(0, 3, 1, 2), True, None),
    # ViT-like: slicing right after the rewritten LayerNorm (here the channel axis itself)
    "layer_norm_then_channel_slice": (lambda s, x: F.layer_norm(x.permute(0, 2, 3, 1), (8,))[..., 2:]
                                      .permute(0, 3, 1, 2), True, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op(name):
    op, prunable, reason = CASES[name]
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 16, 16, dtype=torch.float64),)
    net = Net(op).double()
    net(*x)  # materialise the lazy conv
    net.eval()
    cg = sp.analyze(net, x)
    group = next(g for g in cg.groups if "a" in g.producers)
    assert group.prunable == prunable, group.frozen_reason
    if not prunable:
        assert reason in group.frozen_reason
        return
    for seed in range(3):
        drop = random_drop(cg, seed)
        assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12


def test_grouped_functional_conv_on_a_buffer_prunes_with_its_groups():
    """TResNet's anti-aliasing: a depthwise blur ``F.conv2d(x, self.filt, groups=C)`` on a
    buffer. Its channels prune with the conv before it (the buffer sliced, ``groups``
    re-emitted), and pruning the other groups leaves it alone."""
    class Blur(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.register_buffer("filt", torch.ones(8, 1, 3, 3) / 9)
            self.b = nn.Conv2d(8, 6, 1)
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            x = F.conv2d(F.pad(self.a(x), (1, 1, 1, 1)), self.filt, stride=2, groups=8)
            return self.c(torch.relu(self.b(x)))

    torch.manual_seed(0)
    net, x = Blur().double().eval(), (torch.randn(2, 3, 16, 16, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    assert "depthwise" in next(g for g in cg.groups if "a" in g.producers).kinds
    drop = {next(g for g in cg.groups if "b" in g.producers).id: [1, 4]}
    pruned = sp.prune_channels(net, x, drop)
    assert pruned.filt.shape == (8, 1, 3, 3) and pruned.b.out_channels == 4
    assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(pruned, x)) <= 1e-12
    drop = {next(g for g in cg.groups if "a" in g.producers).id: [0, 5, 6]}
    pruned = sp.prune_channels(net, x, drop)
    assert pruned.filt.shape == (5, 1, 3, 3) and pruned.a.out_channels == 5
    assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(pruned, x)) <= 1e-12


def test_expand_to_a_constant_size_freezes():
    net = Net(lambda s, x: x + x.mean(1, keepdim=True).expand(2, 8, 16, 16))
    net(torch.randn(2, 3, 16, 16))
    cg = sp.analyze(net.eval(), torch.randn(2, 3, 16, 16))
    assert not cg.group("a").prunable and "constant size" in cg.group("a").frozen_reason


def stochastic_depth(x, p, mode, training=True):
    """Stands in for torchvision.ops.stochastic_depth (not importable beside this torch)."""
    if not training or p == 0.0:
        return x
    noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype).bernoulli_(1 - p)
    return x * noise / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class StochasticDepthBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        return self.c(x + stochastic_depth(self.b(x), 0.2, "row", self.training))


def test_torchvision_stochastic_depth_is_channel_wise():
    net, x = StochasticDepthBlock().eval().double(), (torch.randn(2, 3, 12, 12, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    assert cg.group("a").prunable and "residual" in cg.group("a").kinds
    drop = {"a": [0, 3]}
    assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12


def test_channel_wise_params_on_a_fixed_axis_are_frozen():
    """A BN, a depthwise conv and a functional BN after a tensor whose channel axis no
    prunable channel reaches (a Gram matrix's rows, as HaloNet's attention output): their
    parameters may not own prunable channels, since the input cannot lose any."""
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.w, self.b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
            self.register_buffer("rm", torch.randn(16))
            self.register_buffer("rv", torch.rand(16) + 0.5)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            t = self.a(x).flatten(2)                                   # (N, 8, 16)
            g = (t.transpose(1, 2) @ t).reshape(x.shape[0], 16, 4, 4)  # rows: spatial positions
            g = self.dw(torch.relu(self.bn(g)))
            return self.c(torch.relu(F.batch_norm(g, self.rm, self.rv, self.w, self.b)))

    torch.manual_seed(0)
    net, x = Gram().double().eval(), (torch.randn(2, 3, 4, 4, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    for producer in ("bn", "dw"):
        assert not any(g.prunable for g in cg.groups if producer in g.producers), producer
    for seed in range(3):
        drop = random_drop(cg, seed)
        assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12


def test_global_context_attention_keeps_its_single_channel_apart():
    """GCNet's context block: ``x @ softmax(conv_attn(x))`` contracts the spatial axis. The
    attention map's single channel must not join x's channels (it did, through the
    contracted axis, and the decision then dropped it)."""
    class GC(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.conv_attn = nn.Conv2d(8, 1, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = torch.relu(self.a(x))
            n, c, h, w = x.shape
            attn = torch.softmax(self.conv_attn(x).reshape(n, 1, h * w), dim=-1).unsqueeze(3)
            context = (x.reshape(n, c, h * w).unsqueeze(1) @ attn).view(n, c, 1, 1)
            return self.b(x + context)

    torch.manual_seed(0)
    net, x = GC().double().eval(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    stream = next(g for g in cg.groups if "a" in g.producers)
    assert stream.prunable and stream.width == 8 and "conv_attn" not in stream.producers
    for seed in range(3):
        drop = random_drop(cg, seed)
        assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12
    pruned, result = sp.prune_one_shot(net.float(), (x[0].float(),), 0.25, round_to=None)  # 2 of 8
    assert pruned.conv_attn.out_channels == 1 and abs(result.achieved_ratio - 0.25) <= 0.01


def test_count_sizing_other_channels_of_the_same_width_is_written_out():
    """``c(x).view(n, x.shape[1], -1)``: the size would follow x's pruned width at run time,
    but it is a model constant, so surgery writes c's pruned width in its place and c's
    output channels (the same width, another group) prune apart from x's."""
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = torch.relu(self.a(x))
            y = self.c(x).view(x.shape[0], x.shape[1], -1).view(x.shape[0], -1, x.shape[2], x.shape[3])
            return self.b(torch.relu(y))

    torch.manual_seed(0)
    net, x = Sized().double().eval(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    a, c = (next(g for g in cg.groups if p in g.producers) for p in "ac")
    assert a.prunable and c.prunable and a is not c
    for seed in range(3):
        drop = random_drop(cg, seed)
        assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12


def test_a_whole_shape_sizing_other_channels_is_written_out():
    """DPT's neck: ``proj(x.flatten(2).mT).mT.reshape(x.shape)``: the projection's output takes
    the stream's whole shape; the stream's count is written as the projection's pruned width,
    the batch and spatial sizes stay read from the shape, and both groups prune apart."""
    class Readout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.proj, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = torch.relu(self.a(x))
            y = self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
            return self.b(torch.relu(y))

    torch.manual_seed(0)
    net, x = Readout().double().eval(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    cg = sp.analyze(net, x)
    a, proj = (next(g for g in cg.groups if p in g.producers) for p in ("a", "proj"))
    assert a.prunable and proj.prunable and a is not proj
    for drop in ({a.id: [0, 1, 2], proj.id: [5]}, {a.id: [7]}, {proj.id: [0, 3]}, random_drop(cg, 0)):
        assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-12
