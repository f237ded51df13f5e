"""Tests for softprune_fx.onnx_check (ONNX export/check, output comparison, latency) and passes.flops."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn as nn

from softprune_fx import onnx_check as verify
from softprune_fx.passes.errors import OnnxExportError, SoftpruneError
from softprune_fx.passes.flops import count_flops, count_params
from softprune_fx.onnx_check import (
    check_onnx,
    export_onnx,
    flatten_outputs,
    max_abs_diff,
    ort_latency,
    relative_tolerance_ok,
    run_onnx,
)


class DictNet(nn.Module):
    """Conv-BN-ReLU trunk with two heads returned as a dict in non-sorted key order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.p5 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.p3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return {"p5": self.p5(y), "p3": self.p3(y)}


class ShuffleNet(nn.Module):
    """nn.ChannelShuffle has no TorchScript ONNX symbolic: needs the dynamo fallback."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ChannelShuffle(2), nn.Conv2d(8, 4, 1)
        )

    def forward(self, x):
        return self.net(x)


class Unexportable(nn.Module):
    """bessel_j0 has no ONNX translation in either exporter."""

    def forward(self, x):
        return torch.special.bessel_j0(x)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def dict_export(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize_bn(DictNet())
    path = tmp_path_factory.mktemp("dict") / "dict.onnx"
    info = export_onnx(model, torch.randn(1, 3, 16, 16), path)
    return model, path, info


def test_flatten_outputs_names_and_order():
    t = torch.zeros(1)
    assert [n for n, _ in flatten_outputs(t)] == ["output"]
    assert [n for n, _ in flatten_outputs((t, t))] == ["output_0", "output_1"]
    assert [n for n, _ in flatten_outputs({"p5": t, "p3": t})] == ["p5", "p3"]
    nested = (t, {"p3": t, "aux": [t, None, t]}, 3)
    assert [n for n, _ in flatten_outputs(nested)] == [
        "output_0", "output_1_p3", "output_1_aux_0", "output_1_aux_2"]
    a, b = torch.ones(2), torch.zeros(2)
    assert [x is y for (_, x), y in zip(flatten_outputs({"b": a, "a": b}), (a, b))] == [True, True]


def test_tolerance_rule():
    ref = {"big": torch.tensor([200.0, -1.0]), "small": torch.tensor([0.1])}
    got = [torch.tensor([200.015, -1.0]), torch.tensor([0.1 + 9e-5])]
    assert max_abs_diff(ref, got) == pytest.approx(0.015, rel=1e-3)
    assert relative_tolerance_ok(ref, got, 1e-4)  # 0.015 <= 1e-4 * 200, 9e-5 <= 1e-4 * 1
    got[1] = torch.tensor([0.1 + 2e-4])  # small output: allowed 1e-4 * max(1, 0.1)
    assert not relative_tolerance_ok(ref, got, 1e-4)
    half = torch.tensor([0.5, -0.25])  # allowed 1e-4 * max(1, 0.5) = 1e-4, not 1.5e-4
    assert not relative_tolerance_ok(half, half + 1.2e-4, 1e-4)
    assert relative_tolerance_ok(half, half + 0.8e-4, 1e-4)
    big = torch.tensor([-200.0, 3.0])  # allowed 1e-4 * 200 = 0.02
    assert relative_tolerance_ok(big, big + 0.0199, 1e-4)
    assert not relative_tolerance_ok(big, big + 0.0201, 1e-4)
    assert max_abs_diff(torch.zeros(2), torch.zeros(3)) == float("inf")
    assert not relative_tolerance_ok((torch.zeros(1),), (torch.zeros(1), torch.zeros(1)), 1.0)
    assert not relative_tolerance_ok(torch.zeros(1), torch.tensor([float("nan")]), 1.0)


def test_export_dict_outputs_torchscript(dict_export):
    model, path, info = dict_export
    assert info.exporter == "torchscript" and info.seconds > 0
    assert info.output_names == ["p5", "p3"]
    proto = onnx.load(str(path), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["p5", "p3"]
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param, "batch axis must be dynamic"
    assert sorted(p.name for p in path.parent.iterdir()) == ["dict.onnx"]  # no temp left
    for batch in (1, 3):
        check = check_onnx(model, torch.randn(batch, 3, 16, 16), path)
        assert check.ok, check
        assert set(check.max_abs_diff) == {"p5", "p3"}
    out = run_onnx(path, torch.randn(3, 3, 16, 16))
    assert [o.shape for o in out] == [(3, 6, 8, 8), (3, 4, 16, 16)]


def test_channel_shuffle_falls_back_to_dynamo(tmp_path):
    torch.manual_seed(0)
    model, path = ShuffleNet(), tmp_path / "shuffle.onnx"
    info = export_onnx(model, torch.randn(1, 3, 12, 12), path)
    assert info.exporter == "dynamo"
    assert info.output_names == ["output"]
    proto = onnx.load(str(path), load_external_data=False)
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shuffle.onnx"]
    for batch in (1, 3):
        check = check_onnx(model, torch.randn(batch, 3, 12, 12), path)
        assert check.ok, check


def test_check_onnx_detects_wrong_file(dict_export):
    model, path, _ = dict_export
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.p3.weight.add_(0.05)
    x = torch.randn(2, 3, 16, 16)
    assert check_onnx(model, x, path).ok
    bad = check_onnx(other, x, path)
    assert not bad.ok
    assert bad.max_abs_diff["p3"] > bad.limits["p3"]
    assert bad.max_abs_diff["p5"] <= bad.limits["p5"]  # only the changed head differs


def test_export_failure_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(OnnxExportError) as err:
        export_onnx(Unexportable(), torch.rand(2, 4), path)
    msg = str(err.value)
    assert "\n" not in msg and "torchscript:" in msg and "dynamo:" in msg
    assert "bessel" in msg
    assert isinstance(err.value, SoftpruneError)
    assert list(tmp_path.iterdir()) == []


def test_export_failure_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        open(args[2], "wb").write(b"partial")  # a half-written temp must be removed too
        raise RuntimeError(f"boom dynamo={kwargs['dynamo']}\nsecond line")

    monkeypatch.setattr(verify.torch.onnx, "export", broken)
    with pytest.raises(OnnxExportError, match="boom dynamo=False.*boom dynamo=True"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert path.read_bytes() == b"old"


def test_ort_latency_interleaved(dict_export, tmp_path):
    _, path, _ = dict_export
    small = tmp_path / "small.onnx"
    export_onnx(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 16, 16), small)
    stats = ort_latency({"dict": str(path), "small": str(small)}, torch.randn(2, 3, 16, 16),
                        warmup=2, repeats=7)
    assert list(stats) == ["dict", "small"]
    for s in stats.values():
        assert s.repeats == 7
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms


def test_count_flops_conv_linear_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # out 8 x 16 x 16, each 3 * 3 * 3 MACs
    assert count_flops(conv, torch.randn(2, 3, 16, 16)) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    grouped = nn.Conv2d(8, 16, 3, stride=2, groups=4, bias=False)  # out 16 x 7 x 7, 2*3*3 MACs
    assert count_flops(grouped, torch.randn(1, 8, 16, 16)) == 2 * (16 * 7 * 7) * (2 * 3 * 3)
    assert count_flops(nn.Linear(10, 5), torch.randn(4, 10)) == 2 * 4 * 10 * 5
    with_bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    assert count_flops(with_bn, torch.randn(2, 3, 16, 16)) == count_flops(
        conv, torch.randn(2, 3, 16, 16))  # bias, BN and ReLU not counted


def test_count_params():
    assert count_params(nn.Linear(10, 5)) == 55
    shared = nn.Linear(4, 4, bias=False)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 16


def test_models_left_untouched(tmp_path):
    model = DictNet().train()
    model.p3.eval()  # mixed flags must survive; the BN in train mode must not update stats
    flags = {name: m.training for name, m in model.named_modules()}
    stats = copy.deepcopy(model.stem[1].state_dict())
    x = torch.randn(2, 3, 16, 16)
    count_flops(model, x)
    export_onnx(model, x, tmp_path / "m.onnx")
    check_onnx(model, x, tmp_path / "m.onnx")
    assert {name: m.training for name, m in model.named_modules()} == flags
    for key, value in model.stem[1].state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ leaves with data-dependent branches
class _Branchy(nn.Module):
    def forward(self, x):
        if x.mean() > 0.5:
            return x * 2
        return x - 1


class _TryBranchy(nn.Module):
    def forward(self, x):
        try:
            big = x.mean() > 0.5
        except RuntimeError:
            big = False
        if big:
            return x * 2
        return x - 1


class _WithLeaf(nn.Module):
    def __init__(self, leaf):
        super().__init__()
        self.c, self.leaf = nn.Conv2d(3, 4, 1), leaf

    def forward(self, x):
        return self.leaf(self.c(x))


def test_scripted_leaf_keeps_its_branch_as_an_onnx_if(tmp_path):
    """The plain TorchScript export bakes the example's branch; the scripted one keeps both."""
    model = _WithLeaf(_Branchy()).eval()
    x = torch.randn(1, 3, 4, 4)
    baked = tmp_path / "baked.onnx"
    export_onnx(model, x, baked, ("torchscript",))
    kept = verify.export_with_leaves(model, x, tmp_path / "kept.onnx", ["leaf"])
    assert kept.scripted == ["leaf"] and kept.one_branch is None
    assert "If" in {n.op_type for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node}
    for value in (5.0, -5.0):
        x = torch.full((2, 3, 4, 4), value)
        assert check_onnx(model, x, tmp_path / "kept.onnx").ok
    assert not all(check_onnx(model, torch.full((2, 3, 4, 4), v), baked).ok for v in (5.0, -5.0))


def test_unscriptable_leaf_is_reported_as_one_branch(tmp_path):
    model = _WithLeaf(_TryBranchy()).eval()
    twin, failed = verify.script_leaves(model, ["leaf"])
    assert "try" in failed["leaf"] and isinstance(twin.leaf, _TryBranchy)
    result = verify.export_with_leaves(model, torch.randn(1, 3, 4, 4), tmp_path / "m.onnx", ["leaf"])
    assert result.one_branch["leaf"] == "leaf" and (tmp_path / "m.onnx").is_file()
    assert result.info.exporter == "torchscript"
