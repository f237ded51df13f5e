"""End-to-end CLI tests of issue 13: honest ONNX verification, tamper-evident artifacts,
--leaf-modules and one trace per run (training, logs, resume and early errors are in
test_cli_training.py, which shares this file's model file).

Model files are written into temporary directories, as a user's own file would be. Runs
that check what a user sees (exit codes, stderr lines, logs without a terminal) go through
a real subprocess; the rest call ``main()`` in-process (the same code).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from softprune_fx.cli import main

TESTS = Path(__file__).resolve().parent
FAST = {"SOFTPRUNE_FX_LATENCY_REPEATS": "2", "SOFTPRUNE_FX_LATENCY_WARMUP": "0"}

MODELS = '''
import os, signal
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def _bn_init(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return net


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it stays a leaf."""
    def forward(self, x):
        if x.mean() > 0.5:
            return x * 2
        return x - 1


class Unscriptable(nn.Module):
    """The same branch behind a try block: TorchScript cannot script it either."""
    def forward(self, x):
        try:
            big = x.mean() > 0.5
        except RuntimeError:
            big = False
        if big:
            return x * 2
        return x - 1


class Diverging(nn.Module):
    """Python the tracer cannot answer as the real run does: a Proxy's type is not Tensor."""
    def forward(self, x):
        return x * 2 if type(x) is torch.Tensor else x - 1


class Net(nn.Module):
    def __init__(self, leaf=None, dict_out=False):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.leaf = leaf if leaf is not None else nn.Identity()
        self.head = nn.Conv2d(16, 4, 1)
        self.dict_out = dict_out

    def forward(self, x):
        y = self.head(self.leaf(self.b(self.a(x)))).mean((2, 3))
        return {"value": y, "aux": y.sum(1)} if self.dict_out else y


class TrainBranch(Net):
    """A detector-like head: raw maps in training, a decoded vector in eval."""
    def forward(self, x):
        maps = self.head(self.b(self.a(x)))
        if self.training:
            return maps
        return maps.mean((2, 3)).softmax(1)


def build():
    torch.manual_seed(0)
    return _bn_init(Net())

def branchy():
    torch.manual_seed(0)
    return _bn_init(Net(Branchy()))

def unscriptable():
    torch.manual_seed(0)
    return _bn_init(Net(Unscriptable()))

def diverging():
    torch.manual_seed(0)
    return _bn_init(Net(Diverging()))

def dict_model():
    torch.manual_seed(0)
    return _bn_init(Net(dict_out=True))

def train_branch():
    torch.manual_seed(0)
    return _bn_init(TrainBranch())

def example_inputs():
    return (torch.randn(1, 3, 8, 8),)


class Interrupting(Dataset):
    """Sends this process SIGINT (a real Ctrl-C) when item ``at`` is read, if asked to."""
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0
        self.at = int(os.environ.get("INTERRUPT_AT_READ", "0"))
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        self.reads += 1
        if self.at and self.reads == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.x[i], self.y[i]


def loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    return DataLoader(Interrupting(x, y), batch_size=8, shuffle=True), DataLoader(TensorDataset(x, y), batch_size=16)

def regression_loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=16)

def maps_loss(output, target):
    if output.dim() == 4:  # training mode: raw maps
        output = output.mean((2, 3))
    return nn.functional.cross_entropy(output, target)

def dict_loss(output, target):
    return nn.functional.mse_loss(output["value"], target) + 0.0 * output["aux"].sum()

def neg_mse(output, target):
    return -float(nn.functional.mse_loss(output["value"], target))
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "trustmodels.py").write_text(textwrap.dedent(MODELS))
    return folder


def run_cli(*args: str, cwd: Path, env: dict | None = None, stderr=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "softprune_fx.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=300, env={**os.environ, **FAST, **(env or {})})


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("softprune-fx: error:")]


# ------------------------------------------------------------------ ONNX that cannot fool
def test_data_dependent_leaf_is_scripted_and_agrees_on_both_branches(models, tmp_path):
    proc = run_cli("prune", f"{models}/trustmodels.py:branchy", "--ratio", "0.2", "--out", str(tmp_path / "o"),
                   cwd=models)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["untraced_leaves"] and "trustmodels.py" in report["untraced_leaves"]["leaf"]
    assert report["onnx_scripted_leaves"] == ["leaf"] and "verified" in proc.stdout
    import onnxruntime as ort
    from softprune_fx.spec import import_file

    import_file(str(models / "trustmodels.py"))  # pruned.pt pickles the leaf as trustmodels.Branchy
    session = ort.InferenceSession(str(tmp_path / "o" / "pruned.onnx"), providers=["CPUExecutionProvider"])
    pruned = torch.load(tmp_path / "o" / "pruned.pt", weights_only=False).eval()
    for value in (5.0, -5.0):  # inputs that take either branch
        x = torch.full((2, 3, 8, 8), value)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, pruned(x).detach(), rtol=1e-4, atol=1e-4)


def test_unscriptable_leaf_exits_3_and_is_never_verified(models, tmp_path):
    out = tmp_path / "o"
    proc = run_cli("prune", f"{models}/trustmodels.py:unscriptable", "--ratio", "0.2", "--out", str(out),
                   cwd=models)
    assert proc.returncode == 3, proc.stderr
    assert "verified" not in proc.stdout and (out / "pruned.onnx").is_file()
    (line,) = error_lines(proc.stderr)
    assert "holds one branch of leaf 'leaf'" in line and "NOT verified" in line
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "onnx_one_branch" and report["onnx_one_branch"]["leaf"] == "leaf"
    proc = run_cli("verify", str(out), cwd=models)
    assert proc.returncode == 3 and "verified" not in proc.stdout
    assert "holds one branch of leaf 'leaf'" in error_lines(proc.stderr)[0]


# ------------------------------------------------------------------ tamper evidence
def _edit_kept(plan):
    g = next(g for g in plan["groups"].values() if g["dropped"])
    g["kept"] = g["kept"][:-1]


def _swap(plan):
    g = next(g for g in plan["groups"].values() if g["dropped"])
    g["kept"][0], g["dropped"][0] = g["dropped"][0], g["kept"][0]
    g["kept"].sort()
    g["dropped"].sort()


def _swap_resealed(plan):  # a consistent swap with a recomputed digest: the weights digest still binds
    from softprune_fx.plan_io import plan_digest
    _swap(plan)
    plan["weights_sha256"] = "0" * 64
    plan["digest"] = plan_digest(plan)


PLAN_EDITS = {"kept": _edit_kept, "swap": _swap, "resealed": _swap_resealed,
              "digest": lambda plan: plan.pop("digest")}


@pytest.fixture(scope="module")
def good_dir(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "o"
    assert main(["prune", f"{models}/trustmodels.py:build", "--ratio", "0.3", "--out", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("edit", sorted(PLAN_EDITS))
def test_verify_fails_on_each_plan_edit(good_dir, tmp_path, edit, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(good_dir, copy)
    plan = json.loads((copy / "plan.json").read_text())
    PLAN_EDITS[edit](plan)
    (copy / "plan.json").write_text(json.dumps(plan, indent=1))
    capsys.readouterr()
    assert main(["verify", str(copy), "-q"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "plan.json" in line or (edit == "resealed" and "state_dict.pt" in line)


def test_apply_plan_refuses_kept_and_dropped_that_disagree(good_dir, models):
    from softprune_fx import apply_plan
    from softprune_fx.passes.errors import SoftpruneError
    from softprune_fx.spec import build_model

    plan = json.loads((good_dir / "plan.json").read_text())
    plan.pop("digest")
    g = next(g for g in plan["groups"].values() if g["dropped"])
    g["kept"].append(g["dropped"][0])  # one channel both kept and dropped
    with pytest.raises(SoftpruneError, match="kept and dropped disagree"):
        apply_plan(build_model(f"{models}/trustmodels.py:build")[0].eval(), None, plan)


@pytest.mark.parametrize("target", ["state_dict.pt", "pruned.onnx", "pruned.pt"])
def test_verify_fails_on_each_file_edit(good_dir, tmp_path, target, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(good_dir, copy)
    if target == "state_dict.pt":
        state = torch.load(copy / target, weights_only=True)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone()
        state[key].view(-1)[0] += 1e-3  # a tiny edit that a tolerance check would let through
        torch.save(state, copy / target)
    else:
        with open(copy / target, "ab") as f:
            f.write(b"\0")
    capsys.readouterr()
    assert main(["verify", str(copy), "-q"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert target in line


# ------------------------------------------------------------------ leaf modules, one trace
def test_leaf_modules_on_deps_and_prune(models, tmp_path, capsys):
    spec = f"{models}/trustmodels.py:build"
    assert main(["deps", spec, "--leaf-modules", "b", "--json", str(tmp_path / "d.json"), "-q"]) == 0
    groups = {g["id"]: g for g in json.loads((tmp_path / "d.json").read_text())["groups"]}
    assert not any(g["prunable"] for gid, g in groups.items() if gid.startswith("b.") or gid == "a.0")
    out = tmp_path / "o"
    assert main(["prune", spec, "--ratio", "0.2", "--leaf-modules", "Sequential", "--out", str(out), "-q"]) == 1
    assert "no prunable channel group" in capsys.readouterr().err  # both blocks are leaves: nothing left


def test_one_shot_prune_traces_once(models, tmp_path, monkeypatch):
    import softprune_fx.api
    import softprune_fx.passes.capture as capture_module

    calls = []
    real = capture_module.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture", counting)
    monkeypatch.setattr(softprune_fx.api, "capture", counting)
    assert main(["prune", f"{models}/trustmodels.py:build", "--ratio", "0.3", "--out", str(tmp_path / "o"),
                 "-q"]) == 0
    assert len(calls) == 1


def test_a_capture_that_computes_something_else_is_refused(models, tmp_path, capsys):
    spec, out = f"{models}/trustmodels.py:diverging", tmp_path / "o"
    for argv in (["deps", spec, "-q"], ["prune", spec, "--ratio", "0.2", "--out", str(out), "-q"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "does not compute what Net computes" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
