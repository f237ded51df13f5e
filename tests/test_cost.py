"""The cost model equals FlopCounterMode on pruned models; the decision lands on target."""
import numpy as np
import pytest
import torch
from conftest import random_drop
from torch.utils.flop_counter import FlopCounterMode
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.errors import BudgetError
from softprune_fx.passes.flops import MORE_FORMULAS
from softprune_fx.cost import CostModel
from softprune_fx.index import ChannelIndex


def flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=MORE_FORMULAS) as counter:
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_cost_model_equals_flop_counter(name):
    model, inputs = ZOO[name]()
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    assert cost.flops(np.ones(index.size, bool)) == flops(model, inputs)
    for seed in range(2):
        drop = random_drop(cg, seed)
        pruned = sp.prune_channels(model, inputs, drop)
        assert cost.flops(index.keep_from_drop(drop)) == pytest.approx(flops(pruned, inputs), rel=1e-9)


def test_marginal_matches_finite_difference():
    model, inputs = ZOO["resnet_basic"]()
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    keep = np.ones(index.size)
    marg = cost.marginal(keep)
    for f in np.flatnonzero(~index.frozen)[:20]:
        k = keep.copy()
        k[f] = 0
        assert cost.flops(keep) - cost.flops(k) == pytest.approx(marg[f], rel=1e-9)


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenetv2", "densenet", "resnext", "shufflenetv2",
                                  "convnext", "efficientnet"])
@pytest.mark.parametrize("ratio,round_to", [(0.3, None), (0.5, None), (0.4, "auto")])
def test_one_shot_lands_within_one_point(name, ratio, round_to):
    model, inputs = ZOO[name]()
    pruned, result = sp.prune_one_shot(model, inputs, ratio, round_to=round_to)
    assert abs(result.achieved_ratio - ratio) <= 0.01
    assert result.achieved_ratio == pytest.approx(1 - flops(pruned, inputs) / flops(model, inputs))
    assert result.max_abs_diff <= 1e-5 * 10


def test_rounding_and_min_width_are_respected():
    model, inputs = ZOO["resnet50_small"]() if "resnet50_small" in ZOO else ZOO["vgg"]()
    pruned, result = sp.prune_one_shot(model, inputs, 0.3, round_to=8, min_width=0.25)
    cg = sp.analyze(model, inputs)
    for g in cg.groups:
        before, after = result.widths[g.id]
        assert after >= min(before, max(1, int(np.ceil(0.25 * before))))
        if g.id not in result.rounding_dropped and before > 8 and after != before:
            assert after % 8 == 0, (g.id, before, after)


def test_unreachable_ratio_raises_with_largest_cut():
    model, inputs = ZOO["resnet_basic"]()
    with pytest.raises(BudgetError, match="largest reachable cut"):
        sp.prune_one_shot(model, inputs, 0.99)


def _pyramid():
    """Three conv groups whose channels cost very different FLOPs (32 px, 16 px, 8 px)."""
    from torch import nn
    layers, cin = [], 3
    for cout, stride in ((32, 1), (64, 2), (128, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()
    return model, (torch.randn(1, 3, 32, 32),)


def _decide(scores_fn, ratio=0.4):
    from softprune_fx.decide import decide
    model, inputs = _pyramid()
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    scores = scores_fn(cg, index)
    d = decide(cg, index, cost, scores, np.ones(index.size, bool), ratio, round_to=None)
    widths = {g.id: (g.width, int(d.keep[index.ids(g.id)].sum())) for g in cg.groups if g.prunable}
    return d, widths


def test_equal_scores_cut_every_group_alike():
    """With no information in the scores the decision keeps the same fraction everywhere,
    instead of cutting the group with the most FLOPs per channel to the floor."""
    d, widths = _decide(lambda cg, index: np.ones(index.size))
    assert abs(d.achieved - 0.4) <= 0.01
    fractions = [after / before for before, after in widths.values()]
    assert len(fractions) == 3 and max(fractions) - min(fractions) <= 0.1, widths


def test_low_scores_are_cut_first():
    """Scores still steer: a group where half the channels score near zero (dead by SCP's
    rule) loses more channels than the others, and exactly its low-scored ones."""
    low = {}

    def scores(cg, index):
        s = np.ones(index.size)
        ids = index.ids(next(g.id for g in cg.groups if g.prunable))     # the 32 px group
        s[ids[1::2]] = 0.01
        low["positions"] = set(range(1, len(ids), 2))
        return s
    d, widths = _decide(scores)
    first = next(iter(widths))
    fractions = {g: after / before for g, (before, after) in widths.items()}
    assert fractions[first] < min(f for g, f in fractions.items() if g != first) - 0.1, widths
    assert set(d.drop[first]) <= low["positions"]


@pytest.mark.parametrize("name", ["functional_bn", "misc_resample", "resnext"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lands_from_a_cut_that_is_too_deep(name, seed):
    """SCP's hard rule can cut far past the target; on tiny models one channel is several
    points of FLOPs, so single steps back up jump over the window and pairs of steps (one
    group up, another down) are needed to land within 1 point."""
    from softprune_fx.decide import decide
    model, inputs = ZOO[name]()
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    rng = np.random.default_rng(seed)
    keep0 = rng.random(index.size) < 0.35
    assert cost.ratio(keep0 | index.frozen) > 0.45
    scores = rng.random(index.size)
    d = decide(cg, index, cost, scores, keep0, 0.4)
    assert abs(d.achieved - 0.4) <= 0.01, d.achieved


def test_decision_keeps_a_channel_in_every_block_of_a_split_piece():
    """Res2NeXt (timm's res2next50): a 1x1 conv's output is split into pieces, each read by
    a grouped conv. Scores that condemn a whole piece must still leave one channel in each
    of its conv blocks, or balancing that conv empties the piece (IllegalDropError)."""
    from torch import nn
    from softprune_fx.decide import decide

    class Res2NeXtBlock(nn.Module):
        def __init__(self, width=8, scale=4, groups=2):
            super().__init__()
            self.scale = scale
            self.conv1 = nn.Sequential(nn.Conv2d(8, width * scale, 1), nn.BatchNorm2d(width * scale), nn.ReLU())
            self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups),
                                                     nn.BatchNorm2d(width), nn.ReLU()) for _ in range(scale - 1))
            self.conv3 = nn.Conv2d(width * scale, 4, 1)

        def forward(self, x):
            spx = torch.chunk(self.conv1(x), self.scale, 1)
            sp_, outs = self.convs[0](spx[0]), []
            outs.append(sp_)
            for i in range(1, self.scale - 1):
                sp_ = self.convs[i](sp_ + spx[i])
                outs.append(sp_)
            return self.conv3(torch.cat(outs + [spx[-1]], 1))

    torch.manual_seed(0)
    model, inputs = Res2NeXtBlock().eval(), (torch.randn(1, 8, 8, 8),)
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    gid = next(g.id for g in cg.groups if "conv1.0" in g.producers)
    scores = np.ones(index.size)
    scores[index.ids(gid)[8:16]] = 0.0           # the second piece: every channel scores 0
    d = decide(cg, index, cost, scores, np.ones(index.size, bool), 0.3, round_to=None)
    drop = cg.legalize(d.drop)
    kept = np.ones(32, bool)
    kept[drop.get(gid, [])] = False
    for piece in range(4):
        blocks = kept[piece * 8:(piece + 1) * 8].reshape(2, 4)
        assert blocks.any(axis=1).all(), (piece, drop.get(gid))
    # the search prices the balanced keep set, so legalizing changes nothing: what it
    # reports is what will be cut
    assert cost.ratio(index.keep_from_drop(drop)) == pytest.approx(d.achieved)


def test_functional_linear_with_keyword_weight_is_costed():
    """``F.linear(x, weight=w, bias=b)`` (timm's EVA): the cost model reads keyword weights."""
    from torch import nn
    import torch.nn.functional as F

    class KwLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.w, self.b = nn.Parameter(torch.randn(12, 8) * 0.3), nn.Parameter(torch.zeros(12))
            self.c = nn.Linear(12, 4)

        def forward(self, x):
            x = torch.relu(self.a(x)).permute(0, 2, 3, 1)
            return self.c(torch.relu(F.linear(x, weight=self.w, bias=self.b)))

    model, inputs = KwLinear().eval(), (torch.randn(1, 3, 8, 8),)
    cg = sp.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    assert cost.flops(np.ones(index.size)) == flops(model, inputs)
    drop = {next(g.id for g in cg.groups if "w" in g.producers): [0, 5, 7]}
    pruned = sp.prune_channels(model, inputs, drop)
    assert cost.flops(index.keep_from_drop(drop)) == pytest.approx(flops(pruned, inputs), rel=1e-9)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_one_shot_reports_the_counted_original_flops(name):
    """prune_one_shot takes the original's FLOPs from the registry's terms (no forward) only
    when the check's count of the pruned model confirms them: its ``flops_before`` is
    FlopCounterMode's count of the original on every zoo model, whichever path it took."""
    model, inputs = ZOO[name]()
    cg = sp.analyze(model, inputs)
    terms = CostModel(cg, cg.index, model, inputs, total="terms").total0
    pruned, result = sp.prune_one_shot(model, inputs, 0.3, analysis=cg)
    assert result.flops_before == flops(model, inputs)
    # every zoo model is covered by the registry's terms (no forward spent on the count)
    assert terms == result.flops_before
    assert result.flops_after == flops(pruned, inputs)
    assert result.analysis.flops == result.flops_before


class _HiddenMatmul(torch.nn.Module):
    """A leaf (not traced) doing FLOPs the registry has no term for."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return (x.flatten(2) @ self.w).reshape(x.shape)  # mixes positions, not channels


class _WithLeaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.hidden = _HiddenMatmul()
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(self.hidden(x)))))


def test_terms_that_miss_flops_are_not_reported():
    """A leaf's matmul has no FLOPs term: the terms' total is short, the check's count
    disagrees, and prune_one_shot counts the original instead of reporting the terms."""
    model, inputs = _WithLeaf().eval(), (torch.randn(1, 3, 4, 4),)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    cg = sp.analyze(model, inputs, leaf_modules=(_HiddenMatmul,))
    terms = CostModel(cg, cg.index, model, inputs, total="terms")
    assert terms.from_terms and terms.total0 < flops(model, inputs)  # the premise: terms miss the matmul
    _, result = sp.prune_one_shot(model, inputs, 0.2, leaf_modules=(_HiddenMatmul,), round_to=None)
    assert result.flops_before == flops(model, inputs)
    assert abs(result.achieved_ratio - 0.2) <= 0.05


def _flop_total(model, inputs) -> int:
    from softprune_fx.passes.flops import FlopTotal
    with torch.no_grad(), FlopTotal() as counter:
        model(*inputs)
    return counter.total


@pytest.mark.parametrize("name", sorted(ZOO))
def test_flop_total_equals_flop_counter_mode(name):
    """The lean counter the check uses reports exactly FlopCounterMode's total."""
    model, inputs = ZOO[name]()
    assert _flop_total(model.eval(), inputs) == flops(model, inputs) > 0


def test_flop_total_on_random_architectures_and_attention():
    from randarch import random_model
    for seed in range(10):
        model, inputs = random_model(seed)
        assert _flop_total(model.eval(), inputs) == flops(model, inputs)
    proj = torch.nn.Linear(16, 48)

    def attention(a):  # sdpa, bmm and einsum: the counted ops of transformer blocks
        q, k, v = proj(a).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.einsum("bhqd,bhkd->bhqk", o, k) @ v
    x = torch.randn(2, 5, 16)
    assert _flop_total(attention, (x,)) == flops(attention, (x,)) > 0


@pytest.mark.parametrize("case", ["linear1d", "linear2d", "linear3d", "linear4d_nobias", "linear_kw", "linear_noncontig",
                                  "conv1d", "conv3d_groups", "conv_unbatched", "conv_kw", "conv_transpose", "matmul_chain",
                                  "bilinear", "ops_mix"])
def test_flop_total_shortcuts_count_what_aten_counts(case):
    """FlopTotal counts convs and linears from their shapes and skips known zero-FLOP calls:
    on every argument form (1-d and N-d linear inputs, unbatched convs, keywords, views) it
    must give FlopCounterMode's aten-level count, and calls it has no shortcut for
    (transposed convs, bilinear, matmul) must still be counted."""
    F = torch.nn.functional
    w2, b2 = torch.randn(6, 4), torch.randn(6)
    cases = {
        "linear1d": lambda: F.linear(torch.randn(4), w2, b2),  # aten mv: not in the registry
        "linear2d": lambda: F.linear(torch.randn(3, 4), w2, b2),
        "linear3d": lambda: F.linear(torch.randn(2, 3, 4), w2, b2),
        "linear4d_nobias": lambda: F.linear(torch.randn(2, 3, 5, 4), w2),
        "linear_kw": lambda: F.linear(input=torch.randn(3, 4), weight=w2, bias=b2),
        "linear_noncontig": lambda: F.linear(torch.randn(4, 3, 2).transpose(0, 2), w2, b2),
        "conv1d": lambda: F.conv1d(torch.randn(2, 4, 9), torch.randn(6, 4, 3), stride=2),
        "conv3d_groups": lambda: F.conv3d(torch.randn(1, 4, 5, 5, 5), torch.randn(8, 2, 3, 3, 3), groups=2, padding=1),
        "conv_unbatched": lambda: F.conv2d(torch.randn(4, 7, 7), torch.randn(6, 4, 3, 3)),
        "conv_kw": lambda: F.conv2d(input=torch.randn(1, 4, 7, 7), weight=torch.randn(6, 4, 3, 3), dilation=2),
        "conv_transpose": lambda: F.conv_transpose2d(torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)),
        "matmul_chain": lambda: (torch.randn(2, 3, 4) @ torch.randn(4, 5)).matmul(torch.randn(5, 2)),
        "bilinear": lambda: F.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5)),
        "ops_mix": lambda: F.relu(F.batch_norm(F.conv2d(torch.randn(1, 3, 6, 6), torch.randn(4, 3, 1, 1)),
                                                torch.zeros(4), torch.ones(4))).flatten(1) @ torch.randn(144, 2),
    }
    fn = cases[case]
    assert _flop_total(fn, ()) == flops(fn, ())
    if case not in ("linear1d", "bilinear"):  # (aten mv and _trilinear: the registry counts neither)
        assert flops(fn, ()) > 0


def test_flop_counter_keeps_fast_paths_as_flop_counter_mode_sees_them():
    """nn.MultiheadAttention and TransformerEncoderLayer take their fused path only when no
    torch-function mode is active: a model holding one is counted at the aten level, so the
    count (and the path its forward takes) is FlopCounterMode's; FlopTotal would count the
    slow path's matmuls instead (the premise)."""
    from softprune_fx.passes.flops import FlopTotal, flop_counter

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
            self.enc = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)

        def forward(self, x):
            return self.enc(self.attn(x, x, x, need_weights=False)[0])
    model, x = Block().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        with flop_counter(model) as counter:
            model(x)
        with FlopTotal() as function_level:
            model(x)
    assert counter.get_total_flops() == flops(model, (x,))
    assert function_level.total != flops(model, (x,))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_cut_is_a_cubic_in_a_uniform_keep_fraction(name):
    """decide's weighing fits the cut at a uniform kept fraction f with a cubic through
    four points: that must be exact (up to rounding) at any other f, on every zoo model
    (site groups, whose positions square f, included)."""
    model, inputs = ZOO[name]()
    cg = sp.analyze(model, inputs)
    index = cg.index
    cost = CostModel(cg, index, model, inputs, total=cg.flops)
    free = np.flatnonzero(~index.frozen)

    def cut(f):
        keep = np.ones(index.size)
        keep[free] = f
        return cost.ratio(keep)
    fs = np.linspace(0, 1, 4)
    poly = np.polyfit(fs, [cut(f) for f in fs], 3)
    for f in (0.13, 0.5, 0.77, 0.91):
        assert np.polyval(poly, f) == pytest.approx(cut(f), abs=1e-9)


def test_default_prune_builds_no_latency_model_without_cached_tables(tmp_path, monkeypatch):
    """round_to='auto' reads latency tables only when some are cached: with an empty cache
    a default prune never builds the latency model (nor imports ONNX for it)."""
    import softprune_fx.latency as latency
    from softprune_fx.latency_cache import has_tables

    monkeypatch.setenv("SOFTPRUNE_LATENCY_CACHE", str(tmp_path))
    assert not has_tables()

    def refuse(*a, **k):
        raise AssertionError("the latency model was built with nothing cached")
    monkeypatch.setattr(latency, "cached_latency_cost", refuse)
    model, inputs = ZOO["resnet_basic"]()
    _, result = sp.prune_one_shot(model, inputs, 0.3)
    assert abs(result.achieved_ratio - 0.3) <= 0.01
    (tmp_path / "table.json").write_text("{}")
    assert has_tables()
    with pytest.raises(AssertionError, match="nothing cached"):
        sp.prune_one_shot(model, inputs, 0.3)


def test_cpu_attention_flops_are_counted_as_on_meta_tensors():
    """CPU SDPA runs a fused kernel torch's flop registry misses (FlopCounterMode counts 0):
    counted as 2*B*H*L*S*(Eq + Ev), as the decomposed matmuls are counted on meta tensors."""
    from softprune_fx.passes.flops import FlopTotal
    counts = []
    for device in ("cpu", "meta"):
        q, k = torch.randn(2, 4, 6, 8, device=device), torch.randn(2, 4, 5, 8, device=device)
        v = torch.randn(2, 4, 5, 3, device=device)
        with torch.no_grad(), FlopTotal() as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        counts.append(counter.total)
    assert counts[0] == counts[1] == 2 * 2 * 4 * 6 * 5 * (8 + 3)
