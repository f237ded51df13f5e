"""Expected group structure on small cases, frozen reasons, constraints and legalize."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import outputs, random_drop, rel_err
from opaque import opaque
from torch import nn
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.errors import IllegalDropError

torch.fx.wrap("opaque")  # this module's name for the op with no rule


def groups_of(name, **kw):
    model, inputs = ZOO[name]()
    return model, inputs, sp.analyze(model, inputs, **kw)


def containing(cg, producer):
    return next(g for g in cg.groups if producer in g.producers)


def test_resnet_stage_is_one_residual_group():
    _, _, cg = groups_of("resnet_basic")
    stem = containing(cg, "conv1")
    assert {"conv1", "layers.0.0.conv2", "layers.0.1.conv2"} <= set(stem.producers)
    assert "residual" in stem.kinds and stem.prunable and stem.width == 8
    stage2 = containing(cg, "layers.1.0.conv2")
    assert {"layers.1.0.downsample.0", "layers.1.1.conv2"} <= set(stage2.producers)
    assert stage2 is not stem
    assert containing(cg, "layers.0.0.conv1").producers == ["layers.0.0.conv1"]
    assert containing(cg, "fc").frozen_reason == "reaches a model output"
    assert not containing(cg, "input:x").prunable


def test_se_gate_joins_its_block_group():
    _, _, cg = groups_of("mobilenetv3")
    g = containing(cg, "features.1.block.2.fc2")
    assert "se" in g.kinds and "depthwise" in g.kinds
    assert "features.1.block.0.0" in g.producers


def test_shuffle_unit_gets_grid_constraint_and_legalize_drops_whole_columns():
    from softprune_fx.passes.flow import Grid
    _, _, cg = groups_of("shufflenetv2")
    assert any(isinstance(c, Grid) for c in cg.constraints)
    g = next(g for g in cg.groups if "shuffle" in g.kinds and g.prunable)
    engine = cg.index.constraints
    column = engine.unit_members[engine.unit_of[cg.index.ids(g.id)[0]]]  # channels shuffled together
    assert len(column) >= 2
    keep = np.ones(cg.index.size, bool)
    keep[column[1:]] = False  # all of the column but one: the nearest legal drop takes it whole
    drop = cg.legalize(cg.index.drop_from_keep(keep))
    assert not cg.index.keep_from_drop(drop)[column].any()
    with pytest.raises(IllegalDropError, match="shuffled"):
        cg.plan({g.id: [0]})


def test_grouped_conv_balance():
    from softprune_fx.passes.flow import Balance
    model, inputs, cg = groups_of("resnext")
    assert sum(isinstance(c, Balance) for c in cg.constraints) >= 4
    g = containing(cg, "layers.0.0.conv1")
    assert "grouped" in g.kinds
    with pytest.raises(IllegalDropError, match="different channel counts"):
        sp.prune_channels(model, inputs, {g.id: [0]})
    drop = cg.legalize({g.id: [0, 4, 8]})
    assert len(drop[g.id]) == 4  # one per conv group (4 groups of 4): the nearest legal drop
    blocks = np.array(drop[g.id]) // 4
    assert sorted(blocks) == [0, 1, 2, 3]
    pruned = sp.prune_channels(model, inputs, drop)
    assert pruned.get_submodule("layers.0.0.conv2").groups == 4
    assert rel_err(outputs(sp.masked(model, inputs, drop), inputs), outputs(pruned, inputs)) < 1e-5


def test_site_groups_for_densenet_and_preact():
    _, _, cg = groups_of("densenet")
    sites = [g for g in cg.groups if g.is_site_group]
    assert {"features.2.conv1:in", "features.3.conv1:in"} <= {g.id for g in sites}
    g = cg.group("features.3.conv1:in")
    assert g.width == 16 and g.kinds == {"site"} and g.prunable
    _, _, cg = groups_of("preact_resnet")
    assert any(g.id.endswith("conv1:in") for g in cg.groups)


def test_site_group_drop_is_local_and_exact():
    model, inputs, cg = groups_of("densenet")
    drop = {"features.3.conv1:in": [0, 5, 9]}
    pruned = sp.prune_channels(model, inputs, drop)
    assert pruned.get_submodule("features.3.conv1").in_channels == 13
    assert pruned.get_submodule("features.2.conv1").in_channels == 12  # others untouched
    assert rel_err(outputs(sp.masked(model, inputs, drop), inputs), outputs(pruned, inputs)) < 1e-5


def test_option_a_pad_channels_are_prunable():
    model, inputs, cg = groups_of("resnet_cifar_a")
    g = next(g for g in cg.groups if "pad" in g.kinds)
    assert g.prunable
    drop = cg.legalize({g.id: [0, g.width - 1]})
    assert rel_err(outputs(sp.masked(model, inputs, drop), inputs),
                   outputs(sp.prune_channels(model, inputs, drop), inputs)) < 1e-5


def test_exact_rewrites_keep_cbam_and_convnext_prunable():
    _, _, cg = groups_of("cbam")
    assert containing(cg, "stem.0").prunable
    assert any(s.kind == "reduce" for s in cg.flow.sites)
    _, _, cg = groups_of("convnext")
    stream = containing(cg, "stage1.0.pwconv2")
    assert stream.prunable and "depthwise" in stream.kinds
    assert containing(cg, "stage1.0.pwconv1").prunable
    assert any(s.kind == "layer_norm" for s in cg.flow.sites)


def test_groupnorm_with_several_channels_per_group_is_exact_and_balanced():
    """GroupNorm(2, C) reads its channels as a whole: a mask site whose statistics the
    surgery re-emits over each group's original channels (the dropped ones as the hard
    mask's zeros), with the same count dropped in every group."""
    model, inputs, cg = groups_of("misc_norms")
    node = next(n for n in cg.gm.graph.nodes if n.op == "call_module"
                and isinstance(cg.gm.get_submodule(n.target), torch.nn.GroupNorm)
                and cg.gm.get_submodule(n.target).num_groups == 2)
    site = next(s for s in cg.flow.sites if s.node is node)
    assert site.kind == "group_norm" and not cg.flow.inexact
    g = next(g for g in cg.groups if g.prunable and node.target in ",".join(g.sites))
    drop = cg.legalize({g.id: [0]})
    assert len(drop[g.id]) == 2  # one per GroupNorm group
    with torch.no_grad():
        ref, got = cg.run_masked(drop), cg.prune(drop)(*inputs)
    assert (ref - got).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(opaque(self.b(self.a(x))).softmax(1) + 0)


def test_unknown_op_freezes_with_reason():
    cg = sp.analyze(Opaque(), torch.randn(1, 3, 12, 12))
    g = containing(cg, "b")
    assert not g.prunable and "no rule for opaque.opaque at node opaque" in g.frozen_reason
    assert containing(cg, "a").prunable


class PairLeaf(nn.Module):
    """A user leaf that reads a tuple of feature maps (ZoeDepth's neck behind ``nn.Identity``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(16, 4, 1)

    def forward(self, pair):
        return self.proj(torch.cat(list(pair), 1))


class IdentityOverPair(nn.Module):
    def __init__(self, leaf: bool):
        super().__init__()
        self.a, self.b, self.ident = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Identity()
        self.head = PairLeaf() if leaf else nn.Conv2d(16, 4, 1)
        self.leaf = leaf

    def forward(self, x):
        pair = self.ident((torch.relu(self.a(x)), torch.relu(self.b(x))))
        return self.head(pair if self.leaf else torch.cat(pair, 1))


@pytest.mark.parametrize("leaf", [False, True])
def test_identity_over_a_tuple_passes_each_layout_and_a_leaf_behind_it_freezes_them(leaf):
    net, x = IdentityOverPair(leaf).eval(), (torch.randn(1, 3, 10, 10),)
    cg = sp.analyze(net, x, leaf_modules=(PairLeaf,) if leaf else ())
    a, b = containing(cg, "a"), containing(cg, "b")
    assert a.prunable != leaf and b.prunable != leaf  # a leaf's inputs are frozen, tuple items too
    if not leaf:
        drop = random_drop(cg, 0)
        assert drop and rel_err(outputs(sp.masked(net, x, drop), x), outputs(sp.prune_channels(net, x, drop), x)) <= 1e-5


def my_act(x):
    return x * torch.sigmoid(x)


torch.fx.wrap("my_act")


class CustomAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(my_act(self.a(x)))


def test_register_op_makes_a_custom_op_prunable():
    from softprune_fx.passes.registry import _REGISTRY
    from softprune_fx.passes.ops.elementwise import same_rule
    net, x = CustomAct(), (torch.randn(1, 3, 10, 10),)
    assert not containing(sp.analyze(net, x), "a").prunable  # no rule: frozen
    sp.register_op(my_act, rule=same_rule)
    try:
        assert containing(sp.analyze(net, x), "a").prunable
        assert rel_err(outputs(sp.masked(net, x, {"a": [1, 2]}), x),
                       outputs(sp.prune_channels(net, x, {"a": [1, 2]}), x)) < 1e-5
    finally:
        _REGISTRY.pop(my_act, None)


def test_frozen_option_and_errors():
    model, inputs, cg = groups_of("resnet_basic", frozen=("layers.1",))
    assert not containing(cg, "layers.1.0.conv1").prunable
    assert containing(cg, "layers.0.0.conv1").prunable
    with pytest.raises(IllegalDropError, match="frozen"):
        cg.legalize({"fc": [0]})
    with pytest.raises(IllegalDropError, match="unknown group"):
        cg.legalize({"nope": [0]})
    with pytest.raises(IllegalDropError, match="every channel"):
        sp.masked(model, inputs, {"layers.0.0.conv1": list(range(8))})
    # legalize repairs instead: it takes back the one channel that keeps the group alive
    assert cg.legalize({"layers.0.0.conv1": list(range(8))}) == {"layers.0.0.conv1": list(range(1, 8))}
    with pytest.raises(IllegalDropError, match="out of range"):
        sp.masked(model, inputs, {"layers.0.0.conv1": [99]})


def test_untraceable_submodule_becomes_a_frozen_leaf():
    model, inputs, cg = groups_of("untraceable")
    assert cg.untraced
    frozen = [g for g in cg.groups if "untraceable submodule" in g.frozen_reason]
    assert frozen and any(g.prunable for g in cg.groups)


def test_random_drops_respect_constraints_on_every_model():
    for name in sorted(ZOO):
        _, _, cg = groups_of(name)
        drop = random_drop(cg, 11)
        cg.plan(drop)  # legal by construction: must not raise


def test_reports_render():
    from rich.console import Console
    _, _, cg = groups_of("densenet")
    console = Console(record=True, width=200)
    console.print(cg.summary())
    text = console.export_text()
    assert "features.3.conv1:in" in text and "prunable" in text
    data = __import__("json").loads(cg.to_json())
    assert {g["id"] for g in data["groups"]} == {g.id for g in cg.groups}
    graph = cg.to_networkx()
    assert graph.has_edge("layer:features.3.conv2", "group:features.3.conv2")


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt downsampling norm: channels-first via permutes and F.layer_norm."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DownsampleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3)
        self.norm = LayerNorm2d(12)
        self.down = nn.Conv2d(12, 16, 2, stride=2)
        self.bound = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = self.down(self.norm(self.stem(x)))
        return self.head(torch.clamp(y, max=self.bound))  # per-channel bounds: a parameter


def test_functional_layer_norm_and_per_channel_clamp_bounds_prune_exactly():
    torch.manual_seed(0)
    net = DownsampleNet().eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.normal_()
    x = (torch.randn(2, 3, 14, 14, dtype=torch.float64),)
    net = net.double()
    cg = sp.analyze(net, x)
    stem, down = cg.group("stem"), cg.group("down")
    assert stem.prunable and down.prunable
    assert "down" in down.producers and any(p.endswith("bound") for p in down.members)
    drop = {"stem": [0, 5], "down": [1, 2, 3]}
    pruned = sp.prune_channels(net, x, drop)
    assert pruned.get_parameter("bound").shape[1] == 13
    assert rel_err(outputs(sp.masked(net, x, drop), x), outputs(pruned, x)) < 1e-12


def test_count_sizing_other_channels_is_written_out():
    """x.shape[1] reshaping a tensor whose channel axis is not x's channels: the count is a
    model constant, so surgery writes the reshape's pruned extent in its place and x's
    group stays prunable; a tensor reshaped by a count of its own channels too."""
    model, inputs, cg = groups_of("count_sized")
    stem = containing(cg, "stem.0")
    assert stem.prunable and containing(cg, "mix.0").prunable
    model, inputs = model.double(), tuple(t.double() for t in inputs)
    drop = {stem.id: [0, 3, 7], containing(cg, "mix.0").id: [1]}
    pruned = sp.prune_channels(model, inputs, drop)
    assert pruned.get_submodule(stem.producers[0]).out_channels == 13
    assert rel_err(outputs(sp.masked(model, inputs, drop), inputs), outputs(pruned, inputs)) < 1e-12


def test_functional_bn_in_a_site_group_chain_is_sliced_by_position():
    """timm's BatchNormAct2d traces to F.batch_norm on get_attr buffers; inside a site group
    the buffers must lose the positions the site group drops, not only the class drops."""
    model, inputs, cg = groups_of("bnact_blocks")
    assert {"pre_conv1:in", "pw:in"} <= {g.id for g in cg.groups if g.prunable}
    drop = {"pre_conv1:in": [0, 3, 5], "pw:in": [1]}
    pruned = sp.prune_channels(model, inputs, drop)
    assert pruned.pre_bn.running_mean.shape[0] == 13 and pruned.pre_conv1.in_channels == 13
    assert pruned.dw_bn.weight.shape[0] == 15 and pruned.stem.out_channels == 16
    assert rel_err(outputs(sp.masked(model, inputs, drop), inputs), outputs(pruned, inputs)) <= 1e-5


def test_frozen_prefix_stops_at_a_dot_boundary():
    """frozen=("features.1",) freezes features.1's channels and site group, never
    features.10's or features.11's (a bare startswith did)."""
    from zoo_cnn import DenseNet
    torch.manual_seed(0)
    model = DenseNet(growth=4, blocks=(11,), init=8).eval()
    inputs = (torch.randn(2, 3, 16, 16),)
    cg = sp.analyze(model, inputs, frozen=("features.1",))
    by_id = {g.id: g for g in cg.groups}
    assert by_id["features.10.conv1:in"].prunable and by_id["features.11.conv1:in"].prunable
    assert containing(cg, "features.10.conv1").prunable
    assert not containing(cg, "features.1.conv1").prunable
    assert by_id["features.10.conv1:in"].frozen_channels == []
    frozen_sg = sp.analyze(model, inputs, frozen=("features.10",))
    assert not frozen_sg.group("features.10.conv1:in").prunable
    assert frozen_sg.group("features.11.conv1:in").prunable


def test_a_group_norm_with_several_channels_per_group_never_sits_in_a_site_group_chain():
    """MobileViTV2's ``GroupNorm(1, C)``: its statistics span the channels, so selecting
    them before it (what a site group's surgery does) would change every output (Hugging
    Face MobileViTV2 pruned 2.7% wrong before the rule). The channel-wise ``GroupNorm(C, C)``
    of the same net still forms its site group, and pruned == masked on every site group."""
    model, inputs = ZOO["eco_groupnorm_stream"]()
    cg = sp.analyze(model, inputs)
    sites = {g.id: g for g in cg.groups if g.is_site_group}
    assert set(sites) == {"layers.2.conv1:in"}
    assert [n.target for n in sites["layers.2.conv1:in"].chain] == ["layers.2.norm"]
    for gid in ("layers.0.conv1:in", "layers.1.conv1:in", "layers.2.conv1:in"):
        if gid in sites:
            drop = cg.legalize({gid: list(range(0, 16, 2))})
            with torch.no_grad():
                ref, got = cg.run_masked(drop), cg.prune(drop)(*inputs)
            assert torch.allclose(ref, got, atol=1e-5), gid
