"""A forward that returns a dict subclass (Hugging Face's ``ModelOutput``) returns the same
type from the captured, masked, pruned and SoftPruner models (passes/outputs.py)."""
import io
from collections import OrderedDict

import pytest
import torch
from drops import fraction_drop
from torch import nn

import softprune_fx as sp
from softprune_fx.onnx_check import check_onnx, export_onnx
from softprune_fx.passes.capture import capture


class Output(OrderedDict):
    """ModelOutput's behaviour: attribute access, integer indexing, None fields dropped."""

    def __init__(self, logits=None, hidden=None):
        super().__init__((k, v) for k, v in (("logits", logits), ("hidden", hidden)) if v is not None)

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __getitem__(self, k):
        return list(self.values())[k] if isinstance(k, int) else super().__getitem__(k)


class Pairs(dict):
    """A dict subclass whose constructor takes a list of pairs, not the items as keywords."""

    def __init__(self, pairs):
        super().__init__(pairs)


class Counted(dict):
    """Takes keywords but adds an item of its own: rebuilt from its items it differs."""

    def __init__(self, **kw):
        super().__init__(kw)
        self["n"] = len(kw)


class Net(nn.Module):
    def __init__(self, out=Output, hidden=True):
        super().__init__()
        self.out, self.hidden = out, hidden
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h.mean((2, 3)))
        if self.out is Pairs:
            return Pairs([("logits", logits), ("hidden", h)])
        return self.out(logits=logits, hidden=h if self.hidden else None)


def _net(**kw):
    torch.manual_seed(0)
    model = Net(**kw).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model, (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("hidden", [True, False])
def test_captured_masked_pruned_and_soft_models_return_the_models_type(hidden):
    model, inputs = _net(hidden=hidden)
    ref = model(*inputs)
    cg = sp.analyze(model, inputs)
    drop = fraction_drop(cg, seed=0)
    assert drop, "the test needs something dropped"
    outs = {"capture": capture(model, inputs)(*inputs), "interpreter": torch.fx.Interpreter(cg.gm).run(*inputs),
            "masked": cg.masked(drop)(*inputs), "pruned": cg.prune(drop)(*inputs),
            "one-shot": sp.prune_one_shot(model, inputs, 0.3)[0](*inputs),
            "soft": sp.SoftPruner(model, inputs, 0.3).model.eval()(*inputs)}
    for where, out in outs.items():
        assert type(out) is Output, where
        assert list(out.keys()) == list(ref.keys()), where
        assert out.logits.shape == ref.logits.shape and out[0] is out.logits, where
    torch.testing.assert_close(outs["capture"].logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(outs["pruned"].logits, outs["masked"].logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # prune_channels traces again: the same drop gives the same numbers
        plain = sp.prune_channels(model, inputs, drop)(*inputs)
    torch.testing.assert_close(plain.logits, outs["pruned"].logits, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Pairs, Counted])
def test_a_type_that_does_not_rebuild_from_its_items_stays_a_plain_dict(cls):
    model, inputs = _net(out=cls)
    ref = model(*inputs)
    out = capture(model, inputs)(*inputs)
    assert type(out) is dict
    assert list(out.keys()) == list(ref.keys())  # the items fx recorded, as before
    pruned = sp.prune_one_shot(model, inputs, 0.3)[0]
    assert type(pruned(*inputs)) is dict


def test_pruned_typed_model_exports_to_onnx_and_pickles(tmp_path):
    model, inputs = _net()
    pruned, _ = sp.prune_one_shot(model, inputs, 0.3)
    info = export_onnx(pruned, inputs, tmp_path / "p.onnx")
    assert info.output_names == ["logits", "hidden"]
    assert check_onnx(pruned, inputs, tmp_path / "p.onnx").ok
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    out, again = pruned(*inputs), loaded(*inputs)
    # loading re-traces the generated code, which records the plain dict again (documented)
    assert type(again) is dict and list(again) == list(out)
    torch.testing.assert_close(again["logits"], out.logits, rtol=0, atol=0)
