"""plan.json: make_plan / apply_plan round trips, fingerprint refusals, spec loading."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from softprune_fx.passes.errors import IllegalDropError, SoftpruneError
from softprune_fx import analyze, apply_plan, make_plan, prune_channels
from softprune_fx.cli_errors import ModelError, UsageError
from softprune_fx.plan_io import graph_fingerprint, load_plan, save_plan
from softprune_fx.spec import build_model, example_inputs_for, load_builder, parse_input_shape

try:
    from .zoo import ZOO
except ImportError:  # tests/ on sys.path
    from zoo import ZOO

CASES = ["resnet_basic", "preact_resnet", "densenet", "multi_io", "fpn", "shufflenetv2", "mobilenetv3"]


def half_drop(model, inputs) -> dict:
    """A legal drop: the first third of each prunable group that legalize accepts with the others."""
    cg = analyze(model, inputs)
    drop: dict = {}
    for g in cg.groups:
        wanted = [i for i in range(max(1, g.width // 3)) if i not in g.frozen_channels]
        if not (g.prunable and g.width > 1 and wanted):
            continue
        try:
            drop = cg.legalize({**drop, g.id: sorted(set(drop.get(g.id, [])) | set(wanted))})
        except IllegalDropError:
            continue
    return drop


def outputs(model, inputs):
    from softprune_fx.onnx_check import flatten_outputs

    with torch.no_grad():
        return [t for _, t in flatten_outputs(model.eval()(*inputs))]


@pytest.mark.parametrize("name", CASES)
def test_round_trip(name, tmp_path):
    """prune_channels(m) and apply_plan(fresh m, plan) + its weights give the same outputs."""
    model, inputs = ZOO[name]()
    drop = half_drop(model, inputs)
    assert drop
    pruned = prune_channels(model, inputs, drop)
    save_plan(make_plan(model, inputs, drop), tmp_path / "plan.json")
    torch.save(pruned.state_dict(), tmp_path / "w.pt")
    fresh, _ = ZOO[name]()
    rebuilt = apply_plan(fresh, None, tmp_path / "plan.json")
    rebuilt.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    bigger = tuple(torch.randn(3, *x.shape[1:]) for x in inputs)  # another batch size
    for a, b in zip(outputs(pruned, bigger), outputs(rebuilt, bigger)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plan_content():
    model, inputs = ZOO["resnet_basic"]()
    drop = half_drop(model, inputs)
    plan = json.loads(json.dumps(make_plan(model, inputs, drop)))
    assert plan["inputs"] == [{"shape": list(inputs[0].shape), "dtype": "float32"}]
    assert len(plan["fingerprint"]) == 64
    for gid, g in plan["groups"].items():
        assert g["dropped"] == sorted(drop.get(gid, []))
        assert sorted(g["kept"] + g["dropped"]) == list(range(g["width"]))


def test_fingerprint_is_stable_and_sensitive():
    m1, x = ZOO["resnet_basic"]()
    m2, _ = ZOO["resnet_basic"]()
    assert graph_fingerprint(analyze(m1, x).gm) == graph_fingerprint(analyze(m2, x).gm)
    assert graph_fingerprint(analyze(m1, x).gm) != graph_fingerprint(analyze(m1, (x[0][:, :, :16, :16],)).gm)
    m3, x3 = ZOO["vgg"]()
    assert graph_fingerprint(analyze(m1, x).gm) != graph_fingerprint(analyze(m3, x3).gm)


def test_refuses_another_model():
    model, inputs = ZOO["resnet_basic"]()
    plan = make_plan(model, inputs, half_drop(model, inputs))
    other, _ = ZOO["resnet_bottleneck"]()
    with pytest.raises(SoftpruneError, match="does not match the plan"):
        apply_plan(other, None, plan)


def test_refuses_same_groups_other_graph():
    """Same group ids and widths, different ops (ReLU -> GELU): only the fingerprint sees it."""
    def net(act):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 3)).eval()

    x = (torch.randn(1, 3, 8, 8),)
    plan = make_plan(net(nn.ReLU), x, {"0": [0, 1]})
    apply_plan(net(nn.ReLU), x, plan)
    with pytest.raises(SoftpruneError, match="traced graph differs"):
        apply_plan(net(nn.GELU), x, plan)


def test_example_inputs_checked_and_model_untouched():
    model, inputs = ZOO["resnet_basic"]()
    plan = make_plan(model, inputs, half_drop(model, inputs))
    fresh, _ = ZOO["resnet_basic"]()
    before = copy.deepcopy(fresh.state_dict())
    apply_plan(fresh, (torch.randn(5, *inputs[0].shape[1:]),), plan)  # other batch: fine
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not fresh.training
    with pytest.raises(SoftpruneError, match="do not match the plan"):
        apply_plan(fresh, (torch.randn(1, 3, 8, 8),), plan)


def test_make_plan_refuses_illegal_drop():
    model, inputs = ZOO["resnet_basic"]()
    cg = analyze(model, inputs)
    g = next(g for g in cg.groups if g.prunable)
    with pytest.raises(IllegalDropError):
        make_plan(model, inputs, {g.id: list(range(g.width))})
    with pytest.raises(SoftpruneError, match="not a softprune-fx plan"):
        load_plan({"groups": {}})


def test_spec_loading(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.c = nn.Conv2d(3, 4, 1)\n"
        "    def forward(self, x):\n        return self.c(x)\n"
        "def build():\n    return Net()\n"
        "def example_inputs():\n    return torch.randn(1, 3, 4, 4)\n")
    spec = f"{tmp_path / 'mymodel.py'}:build"
    model, module = build_model(spec)
    assert type(model).__module__ == "mymodel" and load_builder(spec).__module__ == "mymodel"
    assert build_model(spec)[1] is module  # imported once: classes stay the same objects
    assert example_inputs_for(module, None)[0].shape == (1, 3, 4, 4)
    assert example_inputs_for(spec, "2,3,5,5")[0].shape == (2, 3, 5, 5)
    assert parse_input_shape("1,3,8,8; 1,2") == [(1, 3, 8, 8), (1, 2)]
    assert build_model("torch.nn:Identity")[0].__class__ is nn.Identity
    for bad in ("nocolon", f"{tmp_path}/missing.py:build", f"{tmp_path / 'mymodel.py'}:nothing",
                "not_a_module_xyz:build"):
        with pytest.raises(UsageError):
            load_builder(bad)
    with pytest.raises(UsageError, match=r"has no function 'biuld' \(did you mean 'build'\?\)"):
        load_builder(f"{tmp_path / 'mymodel.py'}:biuld")
    for bad in ("", "1,,3", "a", "1,0", "1x3x8x8", "1,3,8,8,", "(1,3,8,8)", "1.0,3"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
    with pytest.raises(ModelError):
        build_model("torch.nn:Conv2d")  # raises: missing arguments


def test_sealed_plan_detects_edits_and_weights():
    from softprune_fx.plan_io import check_groups_consistent, plan_digest, seal_plan, weights_digest

    model, inputs = ZOO["resnet_basic"]()
    drop = half_drop(model, inputs)
    pruned = prune_channels(model, inputs, drop)
    state = pruned.state_dict()
    plan = seal_plan(make_plan(model, inputs, drop), state)
    assert load_plan(copy.deepcopy(plan))["weights_sha256"] == weights_digest(state)
    edited = copy.deepcopy(plan)
    g = next(g for g in edited["groups"].values() if g["dropped"])
    g["kept"][0], g["dropped"][0] = g["dropped"][0], g["kept"][0]  # still a partition once sorted
    g["kept"].sort(), g["dropped"].sort()
    with pytest.raises(SoftpruneError, match="does not match its digest"):
        load_plan(edited)
    edited.pop("digest")
    check_groups_consistent(edited)  # a consistent partition passes the consistency check ...
    g["dropped"] = g["dropped"][1:]
    with pytest.raises(SoftpruneError, match="kept and dropped disagree"):
        load_plan(edited)             # ... a channel in neither list does not
    other = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in other.items() if v.is_floating_point())
    other[key].view(-1)[0] += 1e-6
    assert weights_digest(other) != plan["weights_sha256"] and plan_digest(plan) == plan["digest"]
