"""The specialising capture (issue 9): Python that reads shapes is answered and recorded,
data-dependent code stays a frozen leaf with its line, no real tensor reaches an op."""
import inspect
import re

import pytest
import torch
import zoo_ecosystem as Z
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import softprune_fx as sp
from softprune_fx.passes import capture as capture_mod
from softprune_fx.passes.capture import capture
from softprune_fx.passes.errors import CaptureError
from softprune_fx.passes.flow import run_flow
from softprune_fx.passes.groups import build_groups
from softprune_fx.passes.specialise import freeze_specialised


def line_of(obj, marker: str) -> str:
    """``zoo_ecosystem.py:N`` of the line of ``obj``'s source that contains ``marker``."""
    lines, start = inspect.getsourcelines(obj)
    n = next(start + i for i, text in enumerate(lines) if marker in text)
    return f"{inspect.getsourcefile(obj).rsplit('/', 1)[1]}:{n}"


def test_yolo_traces_without_leaves_and_its_c2f_blocks_prune():
    model, x = Z.yolo()
    cg = sp.analyze(model, x)
    assert cg.untraced == []
    assert [n.name for n in cg.gm.graph.nodes if n.op == "placeholder"] == ["x"]  # forward(x, *args, **kwargs)
    assert cg.group("b3.2.cv1.conv").prunable and cg.group("o5.cv1.conv").prunable  # list(chunk(2, 1))
    assert cg.group("n3.cv2.conv").prunable  # the Detect input read by `self.shape != shape`
    assert sum(g.prunable for g in cg.groups) >= 40


def test_specialisations_are_recorded_with_their_source_lines():
    model, x = Z.yolo()
    cg = sp.analyze(model, x)
    specs = cg.specialisations
    where = line_of(Z.Detect.forward, "self.shape != shape")
    hit = [s for s in specs if s["where"].endswith(where)]
    assert hit and hit[0]["kind"] == "bool" and hit[0]["value"] is True and "shape" in hit[0]["code"]
    assert hit[0]["reads"][0] == ["cat_13", 0]  # the cached shape includes the batch...
    assert not hit[0]["batch"] and not cg.gm.meta["static_batch"]  # ...but `None != shape` holds at any batch
    chunk = line_of(Z.C2f.forward, "chunk(2, 1)")
    assert sum(s["where"].endswith(chunk) and s["kind"] == "iter" for s in specs) == 8  # one per C2f, no len
    assert cg.to_dict()["specialisations"] == specs


def test_tf_same_padding_and_size_checks_specialise_on_spatial_sizes_only():
    model, x = Z.tf_same()
    cg = sp.analyze(model, x)
    assert cg.untraced == [] and sum(g.prunable for g in cg.groups) >= 4
    assert {s["kind"] for s in cg.specialisations} == {"bool"}  # max(...); math.ceil stays a node (fx autowraps math)
    assert all(d >= 2 for s in cg.specialisations for _, d in s["reads"])
    assert not cg.gm.meta["static_batch"]
    model, x = Z.size_check()
    cg = sp.analyze(model, x)  # the root's `h % 32` check: plain fx fails at the root
    assert cg.untraced == [] and any(g.prunable for g in cg.groups)
    assert any(s["where"].endswith(line_of(Z.SizeCheckNet.forward, "% 32")) for s in cg.specialisations)
    with pytest.raises(CaptureError, match="zoo_ecosystem.py:.*divisible by 32"):
        sp.analyze(model, torch.randn(1, 3, 40, 40))  # the branch the input takes is the user's


def test_data_dependent_branch_is_a_frozen_leaf_with_its_line():
    model, x = Z.data_branch()
    cg = sp.analyze(model, x)
    assert cg.untraced == ["gate"]
    why = cg.gm.meta["untraced_why"]["gate"]
    assert line_of(Z.DataGate.forward, "DATA-DEPENDENT LINE") in why and "tensor contents" in why
    assert not cg.group("a.conv").prunable and cg.group("b.conv").prunable


class DataRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # ROOT DATA LINE
            return self.conv(x)
        return x


class ItemRoot(DataRoot):
    def forward(self, x):
        return self.conv(x) * x.max().item()  # ITEM LINE


@pytest.mark.parametrize("cls,marker", [(DataRoot, "ROOT DATA LINE"), (ItemRoot, "ITEM LINE")])
def test_root_trace_error_names_the_failing_line(cls, marker):
    line = line_of(cls.forward, marker)
    with pytest.raises(CaptureError, match=re.escape(line)):
        sp.analyze(cls(), torch.randn(1, 3, 4, 4))


class DispatchSpy(TorchDispatchMode):
    """Records the device of every tensor any aten op reads or returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


@pytest.mark.parametrize("name", ["eco_yolo", "eco_tf_same", "eco_size_check", "resnet_basic", "eco_std_conv"])
def test_no_real_tensor_reaches_an_op_while_tracing(name, monkeypatch):
    from zoo import ZOO
    model, x = ZOO[name]()
    monkeypatch.setattr(capture_mod.MetaShapeProp, "propagate", lambda *a: pytest.fail("a second shape pass ran"))
    with DispatchSpy() as spy:
        gm = capture(model, x)
    assert spy.devices <= {"meta"}, spy.devices
    assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_user_module_state_is_unchanged_after_analyze():
    model, x = Z.yolo()
    det = model.detect
    before = {k: v for k, v in vars(det).items() if not k.startswith("_")}
    stride, anchors = det.stride, det.anchors
    for _ in range(2):  # the second trace must not read what the first cached
        cg = sp.analyze(model, x)
    assert {k: v for k, v in vars(det).items() if not k.startswith("_")} == before
    assert det.shape is None and det.anchors is anchors and det.anchors.numel() == 0 and det.stride is stride
    assert all(v.device.type == "cpu" for v in model.state_dict().values())
    drop = {"b3.2.cv1.conv": [1, 9], "o4.cv2.conv": [0]}
    drop = cg.legalize(drop)
    pruned = sp.prune_channels(model, x, drop)
    assert not any(isinstance(v, torch.fx.Proxy) for v in vars(pruned).values())
    assert torch.allclose(pruned(*x), sp.masked(model, x, drop)(*x), atol=1e-5)
    assert det.shape is None  # pruning traced again: still untouched


class ReadsChannels(nn.Module):
    """Python turns a channel extent into a constant (`int(x.shape[1])`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        c = int(y.shape[1])  # CHANNEL LINE
        return self.b(y.view(y.shape[0], c, -1).view_as(y))


def test_a_channel_extent_consumed_by_python_freezes_its_group_with_the_line():
    model, x = ReadsChannels().eval(), (torch.randn(2, 3, 8, 8),)
    gm = capture(model, x)
    line = line_of(ReadsChannels.forward, "CHANNEL LINE")
    assert [(r["node"], r["dim"]) for r in gm.meta["frozen_extents"]] == [("a", 1)]
    flow = run_flow(gm)  # run_flow applies freeze_specialised itself
    group = next(g for g in build_groups(flow) if g.id == "a")
    assert not group.prunable and line in group.frozen_reason
    freeze_specialised(flow)  # idempotent
    cg = sp.analyze(model, x)  # and so does the public API
    assert not cg.group("a").prunable and line in cg.group("a").frozen_reason


class Iterates(nn.Module):
    def forward(self, x):
        return torch.stack([row * 2 for row in x])  # BATCH LINE


class ChecksBatch(nn.Module):
    def forward(self, x):
        if x.shape[0] != 3:  # true at any other batch size
            raise ValueError("batch of 3 only")
        return x.reshape(int(x.shape[1]), -1)  # the channel count, not the batch


def test_a_specialisation_on_the_batch_is_flagged():
    gm = capture(Iterates(), (torch.randn(3, 4, 5),))
    spec = next(s for s in gm.meta["specialisations"] if s["kind"] == "iter")
    assert spec["batch"] and spec["value"] == 3 and gm.meta["static_batch"]
    gm = capture(ChecksBatch(), (torch.randn(3, 4, 5),))
    check, size = gm.meta["specialisations"]
    assert check["kind"] == "bool" and check["batch"] and gm.meta["static_batch"]
    assert size["kind"] == "int" and not size["batch"] and size["reads"] == [["x", 1]]
    with pytest.warns(UserWarning, match=r"specialised on the batch size \(.*test_specialise.py:\d+.*valid for that batch size only"):
        sp.analyze(ChecksBatch(), (torch.randn(3, 4, 5),))


def test_no_batch_warning_when_the_trace_does_not_read_the_batch(recwarn):
    model, x = KwOnly().eval(), (torch.randn(2, 3, 8, 8),)
    sp.analyze(model, x)
    assert not [w for w in recwarn if "batch size" in str(w.message)]


class KwOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x, *extra, scale=2.0, mask=None, **kwargs):
        y = torch.relu(self.a(x))
        if mask is not None or extra or kwargs:
            y = y * 0
        return self.b(y) * scale


def test_forward_with_varargs_keyword_only_and_defaults_traces_the_given_inputs():
    model, x = KwOnly().eval(), (torch.randn(2, 3, 8, 8),)
    cg = sp.analyze(model, x)
    assert [n.name for n in cg.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert cg.group("a").prunable
    drop = {"a": [0, 3]}
    assert torch.allclose(sp.prune_channels(model, x, drop)(*x), sp.masked(model, x, drop)(*x), atol=1e-6)


@pytest.mark.parametrize("leaf", ["C2f", "tests.zoo_ecosystem.C2f", "b3.2"])
def test_leaf_modules_accept_class_names_and_module_names(leaf):
    model, x = Z.yolo()
    leaf = leaf.replace("tests.zoo_ecosystem", Z.C2f.__module__)
    cg = sp.analyze(model, x, leaf_modules=[leaf])
    calls = {n.target for n in cg.gm.graph.nodes if n.op == "call_module"}
    assert "b3.2" in calls and ("n4" in calls) == (leaf != "b3.2")


def _drop_and_compare(model, x, drop):
    model, x = model.double(), tuple(t.double() for t in x)
    pruned = sp.prune_channels(model, x, drop)
    ref = sp.masked(model, x, drop)(*x)
    assert (pruned(*x) - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max().item())
    return pruned


def test_functional_grouped_and_depthwise_convs_on_own_parameters_prune():
    model, x = Z.functional_dw()
    cg = sp.analyze(model, x)
    expand = cg.group("expand.weight")
    assert expand.prunable and "depthwise" in expand.kinds and "dw.weight" in expand.members
    assert cg.group("grouped.weight").prunable and "grouped" in cg.group("grouped.weight").kinds
    pruned = _drop_and_compare(model, x, cg.legalize({"expand.weight": [0, 7, 9, 30]}))
    conv = [n for n in pruned.graph.nodes if n.target is torch.conv2d]
    assert conv[1].args[6] == 28 and pruned.dw.weight.shape == (28, 1, 3, 3)  # depthwise: groups re-emitted
    assert pruned.grouped.weight.shape == (16, 7, 3, 3) and conv[2].args[6] == 4  # 4 groups of 7 inputs


def test_weight_standardised_convs_prune_and_fold():
    model, x = Z.std_conv()
    cg = sp.analyze(model, x)
    c2 = next(g for g in cg.groups if "c2.weight" in g.members)
    assert all(cg.group(g).prunable for g in ("c1.weight", "c3.weight")) and c2.prunable
    assert "c2.gain" in c2.members and len(cg.groups) == 6  # ScaledStdConv2d's gain is the conv's
    assert not any("batch_norm" in g.frozen_reason for g in cg.groups)
    drop = {"c1.weight": [0, 5], c2.id: [3]}
    pruned = _drop_and_compare(model, x, drop)
    assert not any(n.target is torch.nn.functional.batch_norm for n in pruned.graph.nodes)  # c1-c3 all folded
    assert not hasattr(pruned, "reshape_as")
    w = model.c1.weight.double()
    std = torch.nn.functional.batch_norm(w.reshape(1, 16, -1), None, None, training=True, eps=1e-6).reshape_as(w)
    keep = [i for i in range(16) if i not in drop["c1.weight"]]
    assert torch.allclose(pruned.c1.weight, std[keep], atol=1e-12)  # the folded, sliced weight


class InheritsConv(nn.Conv2d):
    """HF EfficientNet's depthwise conv: an nn.Conv2d subclass with only its own __init__."""

    def __init__(self, c):
        super().__init__(c, c, 3, padding=1, groups=c, bias=False)


def test_a_torch_layer_subclass_without_overrides_is_that_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), InheritsConv(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    cg = sp.analyze(model, x)
    assert [n.op for n in cg.gm.graph.nodes if n.target == "1"] == ["call_module"]
    assert cg.group("0").prunable and "depthwise" in cg.group("0").kinds
    pruned = _drop_and_compare(model, x, {"0": [2, 3]})
    assert pruned.get_submodule("1").weight.shape == (6, 1, 3, 3)


def test_weight_norm_parametrization_is_frozen_with_a_reason_not_a_failed_surgery():
    """Not folded yet (the weight comes from a ParametrizationList call): frozen, never wrong."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    cg = sp.analyze(model, x)
    assert not cg.group("0.bias").prunable and "weight is computed" in cg.group("0.bias").frozen_reason
    assert torch.equal(sp.prune_channels(model, x, {})(*x), model(*x))
