"""A trace that specialised on the batch size exports a static batch axis (issue 9).

Python that branches on ``x.shape[0]`` is answered at the example's batch, so the traced (and
pruned) graph holds that batch's branch only. The exported ONNX must then fix its batch axis at
that size (ORT refuses other batches instead of computing the wrong branch), the artifacts' ORT
check compares at that batch only and says so, and report.json lists the specialisation with
its source line. A model that never reads the batch keeps its dynamic axis.
"""
from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import softprune_fx as sp
from softprune_fx.cli import main
from softprune_fx.onnx_check import check_onnx, export_onnx, onnx_batch_size, run_onnx

FAST_LATENCY = {"SOFTPRUNE_FX_LATENCY_REPEATS": "3", "SOFTPRUNE_FX_LATENCY_WARMUP": "1"}

MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.a, self.bn, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        if self.branch and x.shape[0] == 2:  # BATCH BRANCH
            y = y * 2
        elif self.branch:
            y = y - 1
        return self.b(y)


def build(branch=True):
    torch.manual_seed(0)
    net = Net(branch)
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.running_mean.uniform_(-0.2, 0.2)
    return net.eval()


def plain():
    return build(branch=False)


def example_inputs():
    return (torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)),)
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("static_batch") / "batchnet.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


@pytest.fixture
def net(model_file):
    import importlib.util
    spec = importlib.util.spec_from_file_location("batchnet", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def batch_dim(path: Path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def branch_line(model_file: Path) -> int:
    return next(i for i, line in enumerate(model_file.read_text().splitlines(), 1) if "BATCH BRANCH" in line)


def pruned_of(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch warning is tested in test_specialise.py
        cg = sp.analyze(model, (x,))
        drop = {g.id: list(range(0, g.width, 2)) for g in cg.groups if g.prunable}
        return cg, cg.prune(drop)


def test_a_batch_specialised_trace_exports_a_static_batch(net, tmp_path):
    model, (x,) = net.build(), net.example_inputs()
    cg, pruned = pruned_of(model, x)
    assert cg.gm.meta["static_batch"]
    path = tmp_path / "p.onnx"
    info = export_onnx(pruned, (x,), path, static_batch=True)
    dim = batch_dim(path)
    assert info.static_batch and dim.dim_value == 2 and not dim.dim_param and onnx_batch_size(path) == 2
    assert check_onnx(pruned, (x,), path).ok  # ORT == torch at the traced batch
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):  # not silently the batch-2 branch
        run_onnx(path, torch.randn(3, 3, 12, 12))
    export_onnx(cg.gm, (x,), tmp_path / "g.onnx")  # static_batch=None: read from the analysis's graph
    assert batch_dim(tmp_path / "g.onnx").dim_value == 2
    export_onnx(pruned, (x,), tmp_path / "q.onnx")  # the pruned model remembers it too
    assert batch_dim(tmp_path / "q.onnx").dim_value == 2


def test_no_batch_specialisation_keeps_the_dynamic_axis(net, tmp_path):
    model, (x,) = net.plain(), net.example_inputs()
    cg, pruned = pruned_of(model, x)
    assert not cg.gm.meta["static_batch"]
    info = export_onnx(pruned, (x,), tmp_path / "p.onnx")
    dim = batch_dim(tmp_path / "p.onnx")
    assert not info.static_batch and dim.dim_param == "batch" and not dim.HasField("dim_value")
    assert onnx_batch_size(tmp_path / "p.onnx") is None
    assert check_onnx(pruned, (torch.randn(3, 3, 12, 12),), tmp_path / "p.onnx").ok


def _prune_cli(model_file: Path, builder: str, out: Path, monkeypatch) -> dict:
    for key, value in FAST_LATENCY.items():
        monkeypatch.setenv(key, value)
    assert main(["prune", f"{model_file}:{builder}", "--ratio", "0.4", "--out", str(out), "--force"]) == 0
    return json.loads((out / "report.json").read_text())


def test_cli_static_batch_check_and_report(model_file, tmp_path, monkeypatch, capsys):
    report = _prune_cli(model_file, "build", tmp_path / "out", monkeypatch)
    assert batch_dim(tmp_path / "out" / "pruned.onnx").dim_value == 2
    per_batch = report["onnx_check"]["per_batch"]
    assert report["status"] == "ok" and report["static_batch"] and report["onnx_check"]["static_batch"] == 2
    assert per_batch["2"]["ok"] and "skipped" not in per_batch["2"] and "max_abs_diff" in per_batch["2"]
    for other in ("1", "3"):
        assert "static batch axis of 2" in per_batch[other]["skipped"]
    assert "static batch axis of 2" in capsys.readouterr().err  # said on the terminal too
    spec = next(s for s in report["specialisations"] if s.get("batch"))
    assert Path(spec["where"]).name == f"batchnet.py:{branch_line(model_file)}" and "x.shape[0] == 2" in spec["code"]
    assert sp.verify_artifacts(tmp_path / "out").ok  # the re-check reads the fixed axis from the file


def test_cli_without_specialisation_checks_every_batch(model_file, tmp_path, monkeypatch):
    report = _prune_cli(model_file, "plain", tmp_path / "out", monkeypatch)
    assert batch_dim(tmp_path / "out" / "pruned.onnx").dim_param == "batch"
    per_batch = report["onnx_check"]["per_batch"]
    assert not report["static_batch"] and report["onnx_check"]["static_batch"] is None
    assert not [b for b in ("1", "2", "3") if "skipped" in per_batch[b]]
    assert not [s for s in report["specialisations"] if s.get("batch")]


def test_deps_lists_the_specialisation_with_its_line(model_file, tmp_path, capsys):
    where = f"batchnet.py:{branch_line(model_file)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["deps", f"{model_file}:build", "--json", str(tmp_path / "deps.json")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("specialised at"))
    assert where in line and "x.shape[0] == 2" in line and "reads the batch size" in line
    deps = json.loads((tmp_path / "deps.json").read_text())
    assert deps["static_batch"] and [s for s in deps["specialisations"] if s["where"].endswith(where)]
