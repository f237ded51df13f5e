"""The package's import names: ``softprune_fx.passes`` only, never a top-level ``passes``;
a user's own ``passes`` module next to their script does not shadow ours; lazy imports."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import torch

import softprune_fx as sp
from zoo import ZOO

from drops import random_drop


def _run(code: str, cwd, extra_path=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(map(str, extra_path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_top_level_passes(tmp_path):
    proc = _run("import passes", tmp_path)
    assert proc.returncode != 0 and "No module named 'passes'" in proc.stderr, proc.stderr


def test_users_own_passes_module_does_not_shadow(tmp_path):
    """A user's passes.py (common among people who write compiler passes) next to the script."""
    (tmp_path / "passes.py").write_text("raise RuntimeError('the user passes module was imported')\n")
    proc = _run("""
        import torch, softprune_fx as sp
        from torch import nn
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        x = torch.randn(2, 3, 8, 8)
        cg = sp.analyze(m, (x,))
        gid = next(g.id for g in cg.groups if g.prunable)
        pruned = sp.prune_channels(m, (x,), {gid: [0, 1]})
        assert pruned.get_submodule('3').in_channels == 6
    """, tmp_path, [tmp_path])
    assert proc.returncode == 0, proc.stderr
    cli = subprocess.run([sys.executable, "-m", "softprune_fx", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert cli.returncode == 0, cli.stderr


def test_import_is_lazy(tmp_path):
    proc = _run("""
        import sys, softprune_fx
        heavy = [m for m in ('rich', 'networkx', 'onnxruntime', 'torch.distributed') if m in sys.modules]
        assert not heavy, heavy
        assert softprune_fx.analyze.__module__ == 'softprune_fx.api'
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_masked_model_pickles_with_softprune_names_only():
    """A masked (soft-mask) training model records softprune_fx.* classes, never passes.*."""
    model, inputs = ZOO["resnet_cifar_a"]()
    pruner = sp.SoftPruner(model, inputs, ratio=0.3)
    blob = pickle.dumps(pruner.model)
    assert b"softprune_fx.passes.masks" in blob
    assert b"\npasses." not in blob and b"cpasses" not in blob and b"\x8c\x06passes" not in blob
    names = {type(m).__module__ for m in pruner.model.modules()}
    assert not any(n == "passes" or n.startswith("passes.") for n in names), names


def test_one_analysis_serves_masked_and_prune(monkeypatch):
    """prune_one_shot traces the model once; masked/prune on the analysis trace nothing."""
    from softprune_fx.passes import capture as capture_mod
    calls = []
    real = capture_mod.trace

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(capture_mod, "trace", counting)
    model, inputs = ZOO["resnet_cifar_a"]()
    pruned, result = sp.prune_one_shot(model, inputs, ratio=0.3)
    assert len(calls) == 1, f"{len(calls)} traces"
    cg = result.analysis
    drop = random_drop(cg, 3)
    with torch.no_grad():
        a = cg.masked(drop).eval()(*inputs)
        b = cg.prune(drop).eval()(*inputs)
    assert len(calls) == 1, f"{len(calls)} traces"
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # forks never touch the analysis: the user's model is unchanged, the analysis re-usable
    assert cg.prune(drop) is not cg.gm and sum(p.numel() for p in model.parameters()) == result.params_before
