"""A pruned model is plain torch: it pickles and loads where softprune_fx cannot be imported."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import outputs, random_drop
from zoo import ZOO

import softprune_fx as sp

BLOCKER = "raise ImportError('softprune-fx must not be needed to load a pruned model')\n"


@pytest.mark.parametrize("name", ["resnet_cifar_a", "densenet", "shufflenetv2", "convnext", "misc_slicing"])
def test_pruned_model_loads_without_softprune(tmp_path, name):
    model, inputs = ZOO[name]()
    pruned = sp.prune_channels(model, inputs, random_drop(sp.analyze(model, inputs), 1))
    for node in pruned.graph.nodes:
        if node.op == "call_function":
            mod = getattr(node.target, "__module__", "") or ""
            assert not mod.startswith(("softprune_fx", "passes")), node.target
    torch.save(pruned, tmp_path / "pruned.pt")
    torch.save({"inputs": inputs, "ref": outputs(pruned, inputs)}, tmp_path / "io.pt")
    for pkg in ("softprune_fx", "passes"):
        (tmp_path / "block" / pkg).mkdir(parents=True)
        (tmp_path / "block" / pkg / "__init__.py").write_text(BLOCKER)
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path[:0] = [{str(tmp_path / 'block')!r}]
        try:
            import softprune_fx
        except ImportError:
            pass
        else:
            raise SystemExit("blocker not active")
        model = torch.load({str(tmp_path / 'pruned.pt')!r}, weights_only=False)
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=False)
        out = model(*io["inputs"])
        outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]
        diff = max(float((a - b).abs().max()) for a, b in zip(outs, io["ref"]))
        assert diff <= 1e-5, f"outputs differ by {{diff}}"
        assert not any(m.startswith(("softprune_fx", "passes")) for m in sys.modules if sys.modules[m]), "imported"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    zoo_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = zoo_dir  # the zoo's own classes must stay importable, as the README says
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


ANNOTATED = '''
from __future__ import annotations
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.a(x)
        return self.b(torch.relu(y))
'''


def test_string_annotations_do_not_break_pickling(tmp_path, monkeypatch):
    (tmp_path / "annotated_model.py").write_text(ANNOTATED)
    monkeypatch.syspath_prepend(str(tmp_path))
    import annotated_model
    net, x = annotated_model.Net().eval(), (torch.randn(1, 3, 8, 8),)
    pruned = sp.prune_channels(net, x, {"a": [0, 1]})
    torch.save(pruned, tmp_path / "p.pt")
    loaded = torch.load(tmp_path / "p.pt", weights_only=False)
    assert torch.equal(loaded(*x), pruned(*x))
