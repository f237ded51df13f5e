"""End-to-end tests of the ``softprune-fx`` CLI (issue 4): artifacts, safe reload, errors.

The model file is written into a temporary directory (``tinymodel.py`` with ``build()``,
``example_inputs()`` and ``loaders()``), as a user's own file would be. The main run and
a few error paths go through a real subprocess; the other error paths call ``main()``
in-process, which is the same code without the interpreter start-up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from softprune_fx.passes.errors import OnnxExportError
from softprune_fx.onnx_check import OnnxCheck
from softprune_fx import apply_plan, verify_artifacts
from softprune_fx.cli import main

try:
    from .zoo import ZOO
except ImportError:  # tests/ on sys.path
    from zoo import ZOO

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAST_LATENCY = {"SOFTPRUNE_FX_LATENCY_REPEATS": "3", "SOFTPRUNE_FX_LATENCY_WARMUP": "1"}
REPORT_KEYS = {"flops_before", "flops_after", "params_before", "params_after", "target_ratio", "achieved_ratio",
               "max_abs_diff_masked", "max_abs_diff_onnx", "latency_ms_before", "latency_ms_after", "groups",
               "onnx_exporter"}
FILES = {"pruned.pt", "state_dict.pt", "plan.json", "pruned.onnx", "report.json", "widths.png"}

MODEL_FILE = '''
import sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import ZOO

NAME = {name!r}

def build():
    return ZOO[NAME]()[0]

def example_inputs():
    return ZOO[NAME]()[1]

def raises():
    raise ValueError("the builder broke on purpose")

def not_a_module():
    return 42

def no_prunable():
    return nn.Sequential(nn.Conv2d(3, 4, 1))

def untrained():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

def loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=8)
'''

BLOCKED_LOAD = '''
import sys, torch
for name in ("softprune_fx", "passes"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " was importable")
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2], weights_only=True)
torch.save(model.eval()(x), sys.argv[3])
'''


def write_model(folder: Path, name: str, stem: str = "tinymodel") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(textwrap.dedent(MODEL_FILE.format(tests=str(TESTS), name=name)))
    return path


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softprune_fx.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **FAST_LATENCY, **(env or {})})


def leftovers(out: Path) -> list[str]:
    """Temporary directories left beside ``out`` (there must be none)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """One real `softprune-fx prune` subprocess run on the basic ResNet of the zoo."""
    work = tmp_path_factory.mktemp("cli")
    spec = f"{write_model(work / 'src', 'resnet_basic')}:build"
    proc = run_cli("prune", spec, "--ratio", "0.4", "--out", "out", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work, work / "out", spec, proc


@pytest.fixture
def fast(monkeypatch):
    for key, value in FAST_LATENCY.items():
        monkeypatch.setenv(key, value)


def test_prune_writes_every_artifact(pruned_dir):
    _, out, _, proc = pruned_dir
    assert FILES <= {p.name for p in out.iterdir()}
    assert leftovers(out) == [] and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["status"] == "ok" and report["failed"] == []
    assert report["flops_after"] < report["flops_before"] and report["params_after"] < report["params_before"]
    assert report["achieved_ratio"] > 0.2 and report["max_abs_diff_onnx"] <= 1e-4
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    assert report["widths_png"] == "written"
    assert any(g["width_after"] < g["width_before"] for g in report["groups"])
    assert {"id", "kinds", "width_before", "width_after"} <= set(report["groups"][0])
    assert "verified" in proc.stdout and "FLOPs" in proc.stdout


def test_pruned_pt_loads_without_softprune(pruned_dir, tmp_path):
    """torch.load(pruned.pt) in a process where importing softprune_fx and passes raises."""
    _, out, spec, _ = pruned_dir
    blocker = tmp_path / "blocker"
    for pkg in ("softprune_fx", "passes"):
        (blocker / pkg).mkdir(parents=True)
        (blocker / pkg / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(out / "pruned.pt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(blocker)})
    assert proc.returncode == 0, proc.stderr
    expected = torch.load(out / "pruned.pt", weights_only=False).eval()(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_safe_path_recreates_the_model(pruned_dir):
    """build() + plan.json + state_dict.pt (weights_only=True) == pruned.pt."""
    _, out, _, _ = pruned_dir
    model, _ = ZOO["resnet_basic"]()
    plan = json.loads((out / "plan.json").read_text())
    rebuilt = apply_plan(model, None, plan)
    rebuilt.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
    whole = torch.load(out / "pruned.pt", weights_only=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), whole.eval()(x), rtol=0, atol=0)
    assert {"fingerprint", "inputs", "groups", "softprune_version"} <= set(plan)
    assert all(sorted(g["kept"] + g["dropped"]) == list(range(g["width"])) for g in plan["groups"].values())


def test_onnx_runs_at_two_batch_sizes(pruned_dir):
    _, out, _, _ = pruned_dir
    model = onnx.load(str(out / "pruned.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [o.name for o in model.graph.output] == ["output"]
    whole = torch.load(out / "pruned.pt", weights_only=False).eval()
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        ref = whole(x).detach().numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_verify_subprocess_and_api(pruned_dir):
    work, out, _, _ = pruned_dir
    proc = run_cli("verify", "out", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    result = verify_artifacts(out, latency=False)
    assert result.ok and result.max_abs_diff <= 1e-4
    assert set(result.checks) == {"1", "2", "3", "normal x5", "constant +5", "constant -5", "example"}


def test_verify_fails_on_tampered_weights(pruned_dir, tmp_path, fast):
    import shutil

    _, out, _, _ = pruned_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = torch.load(copy / "state_dict.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[key] = state[key] + 1.0
    torch.save(state, copy / "state_dict.pt")
    assert main(["verify", str(copy)]) == 1
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2


def test_deps_subprocess(tmp_path):
    spec = f"{write_model(tmp_path, 'densenet')}:build"
    proc = run_cli("deps", spec, "--json", "deps.json", "--dot", "deps.dot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prunable" in proc.stdout and "groups" in proc.stdout
    data = json.loads((tmp_path / "deps.json").read_text())
    assert data["totals"]["prunable_groups"] > 0 and 0 < data["totals"]["prunable_flops_share"] <= 1
    dot = (tmp_path / "deps.dot").read_text()
    assert dot.startswith("strict digraph") and '"group:input:x"' in dot and " -> " in dot


def test_multi_io_in_process(tmp_path, fast, capsys):
    """Two inputs, tuple output; then --force replaces the directory."""
    spec = f"{write_model(tmp_path, 'multi_io', stem='multimodel')}:build"
    out = tmp_path / "out"
    assert main(["prune", spec, "--ratio", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and len(report["inputs"]) == 2
    (out / "stale.txt").write_text("old")
    assert main(["prune", spec, "--ratio", "0.3", "--out", str(out), "--force", "--round-to", "none",
                 "--frozen", "trunk.0.0"]) == 0
    assert not (out / "stale.txt").exists() and FILES <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    widths = {g["id"]: (g["width_before"], g["width_after"]) for g in report["groups"]}
    assert widths["trunk.0.0"][0] == widths["trunk.0.0"][1]
    assert leftovers(out) == []


# ------------------------------------------------------------------ bad input
BAD = [  # (args after SPEC-file substitution, exit code, message fragment)
    (["prune", "{file}", "--ratio", "0.4"], 2, "must have the form"),
    (["prune", "{dir}/missing.py:build", "--ratio", "0.4"], 2, "not found"),
    (["prune", "no_such_module_xyz.sub:build", "--ratio", "0.4"], 2, "module 'no_such_module_xyz.sub' not found"),
    (["prune", "{file}:nope", "--ratio", "0.4"], 2, "has no function 'nope'"),
    (["prune", "{file}:build", "--ratio", "1.5"], 2, "--ratio must be between 0 and 1"),
    (["prune", "{file}:build", "--ratio", "0"], 2, "--ratio must be between 0 and 1"),
    (["prune", "{file}:build", "--ratio", "0.4", "--input-shape", "1,x3"], 2, "malformed --input-shape"),
    (["prune", "{dir}/noex.py:build", "--ratio", "0.4"], 2, "no example input"),
    (["prune", "{file}:build", "--ratio", "0.4", "--round-to", "seven"], 2, "--round-to"),
    (["prune", "{file}:raises", "--ratio", "0.4"], 1, "the builder broke on purpose"),
    (["prune", "{file}:not_a_module", "--ratio", "0.4"], 1, "not a torch.nn.Module"),
    (["prune", "{file}:build", "--ratio", "0.4", "--input-shape", "1,5,16,16"], 1, "expected input"),
    (["prune", "{file}:build", "--ratio", "0.4", "--weights", "{dir}/wrong.pt"], 1, "do not match the model"),
    (["prune", "{file}:build", "--ratio", "0.99"], 1, "largest reachable cut"),
    (["prune", "{file}:no_prunable", "--ratio", "0.4"], 1, "softprune-fx deps"),
]


@pytest.fixture
def bad_setup(tmp_path):
    file = write_model(tmp_path, "resnet_basic")
    (tmp_path / "noex.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Conv2d(3, 4, 1)\n")
    torch.save({"not.a.key": torch.zeros(1)}, tmp_path / "wrong.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return tmp_path, file, out


@pytest.mark.parametrize("argv, code, fragment", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(bad_setup, argv, code, fragment, capsys, fast):
    """Each bad input: its exit code, one line naming the problem, DIR untouched (even with --force)."""
    folder, file, out = bad_setup
    argv = [a.format(file=file, dir=folder) for a in argv] + ["--out", str(out), "--force"]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and err[-1].startswith("softprune-fx: error:")
    assert "Traceback" not in "\n".join(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == []


def test_non_empty_dir_refused_without_force(bad_setup, capsys):
    _, file, out = bad_setup
    assert main(["prune", f"{file}:build", "--ratio", "0.4", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"


def test_errors_in_a_real_process(bad_setup):
    """Exit codes and one-line stderr from the interpreter itself; --debug shows the traceback."""
    folder, file, out = bad_setup
    proc = run_cli("prune", f"{file}:raises", "--ratio", "0.4", "--out", str(out), "--force", "--quiet",
                   cwd=folder)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 2 and lines[0].startswith("softprune-fx: note: --force:")
    assert "the builder broke on purpose" in lines[1] and "Traceback" not in proc.stderr
    proc = run_cli("prune", f"{file}:raises", "--ratio", "0.4", "--out", str(out), "--force", "--debug", cwd=folder)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = run_cli("prune", str(file), "--ratio", "2", cwd=folder)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_onnx_mismatch_writes_dir_and_exits_1(bad_setup, monkeypatch, capsys, fast):
    _, file, out = bad_setup
    bad = OnnxCheck(max_abs_diff={"output": 1.0}, ok=False, tolerance=1e-4, limits={"output": 1e-4})
    monkeypatch.setattr("softprune_fx.artifacts.check_onnx", lambda *a, **k: bad)
    assert main(["prune", f"{file}:build", "--ratio", "0.4", "--out", str(out), "--force"]) == 1
    assert "differs from torch" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "onnx_mismatch" and report["failed"] and FILES <= {p.name for p in out.iterdir()}


def test_onnx_export_failure_exits_3(bad_setup, monkeypatch, capsys, fast):
    _, file, out = bad_setup

    def fail(*args, **kwargs):
        raise OnnxExportError("both exporters failed (simulated)")

    monkeypatch.setattr("softprune_fx.artifacts.export_onnx", fail)
    monkeypatch.setattr("softprune_fx.onnx_check.export_onnx", fail)
    assert main(["prune", f"{file}:build", "--ratio", "0.4", "--out", str(out), "--force"]) == 3
    assert "ONNX export failed" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "onnx_export_failed" and "simulated" in report["onnx_error"]
    assert not (out / "pruned.onnx").exists() and (out / "pruned.pt").exists()


def test_failure_while_writing_leaves_dir_untouched(bad_setup, monkeypatch, fast):
    _, file, out = bad_setup

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("softprune_fx.artifacts.plot_widths", broken)
    assert main(["prune", f"{file}:build", "--ratio", "0.4", "--out", str(out), "--force"]) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == []


FIXED_BATCH = """
import torch, torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 5)
        nn.init.uniform_(self.c[1].weight, 0.5, 1.5)
        nn.init.normal_(self.c[1].bias, 0.0, 0.3)
    def forward(self, x):
        return self.fc(self.c(x).view(2, -1))  # the batch size is fixed in the code
def build():
    return Net()
def example_inputs():
    return (torch.randn(2, 3, 4, 4),)
"""


def test_fixed_batch_model_is_checked_at_its_own_batch(tmp_path, capsys, fast):
    (tmp_path / "fixed.py").write_text(FIXED_BATCH)
    out = tmp_path / "out"
    assert main(["prune", f"{tmp_path / 'fixed.py'}:build", "--ratio", "0.3", "--out", str(out)]) == 0
    assert "torch cannot run batch 1" in capsys.readouterr().err
    check = json.loads((out / "report.json").read_text())["onnx_check"]
    assert check["ok"] and "skipped" in check["per_batch"]["3"] and check["per_batch"]["2"]["ok"]
    assert check["per_batch"]["constant +5"]["ok"] and check["per_batch"]["example"]["ok"]
    result = verify_artifacts(out, latency=False)
    assert result.ok and result.notes


def test_untrained_bn_warning_and_missing_matplotlib(tmp_path, monkeypatch, capsys, fast):
    spec = f"{write_model(tmp_path, 'resnet_basic')}:untrained"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    out = tmp_path / "out"
    assert main(["prune", spec, "--ratio", "0.3", "--out", str(out), "--input-shape", "1,3,8,8"]) == 0
    assert "look untrained" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["widths_png"].startswith("skipped") and not (out / "widths.png").exists()
    assert report["warnings"]


def test_prune_with_data(tmp_path, fast):
    pytest.importorskip("softprune_fx.train")
    spec = write_model(tmp_path, "resnet_basic")
    out = tmp_path / "out"
    assert main(["prune", f"{spec}:build", "--ratio", "0.3", "--data", f"{spec}:loaders", "--epochs", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["accuracy_masked"] <= 1 and 0 <= report["accuracy_pruned"] <= 1
    assert report["status"] == "ok" and not Path(f"{out}.checkpoints").exists()
