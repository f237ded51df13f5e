"""Capture reads the model without changing it, and costs no real forward."""
import copy

import pytest
import torch
from torch import nn
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.capture import capture
from softprune_fx.passes.errors import CaptureError


def _window(x, size):
    """Edits its list argument, as torchvision's Swin3D ``_get_window_and_shift_size``."""
    size[0] = min(size[0], x.shape[-1])
    return x * size[0]


torch.fx.wrap("_window")


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "convnext", "untraceable", "functional_bn"])
def test_analyze_never_changes_the_model(name):
    model, inputs = ZOO[name]()
    model.train()  # BN running statistics would move on a real training forward
    before, modes = state(model), [m.training for m in model.modules()]
    sp.analyze(model, inputs)
    sp.prune_channels(model, inputs, {})
    sp.masked(model, inputs, {})
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for m in model.modules()]


def test_shapes_come_from_meta_tensors_not_a_real_forward():
    model, inputs = ZOO["resnet_basic"]()
    seen = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].device.type))
    big = (torch.randn(4, 3, 1024, 1024),)
    gm = capture(model, big)
    assert "cpu" not in seen  # convs never see a real tensor (most are not even called)
    out = gm.graph.output_node().args[0].meta["val"]
    assert out.shape == (4, 10) and out.device.type == "meta"


def test_bare_tensor_input_is_wrapped():
    model, inputs = ZOO["vgg"]()
    cg = sp.analyze(model, inputs[0])
    assert any(g.prunable for g in cg.groups)


def test_training_mode_is_traced_as_is():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.a(x)
            if self.training:
                x = torch.roll(x, 1, 1)  # unknown op only in training mode
            return self.b(x)
    net, x = Branchy(), torch.randn(1, 3, 8, 8)
    assert not sp.analyze(net.train(), x).group("a").prunable
    assert sp.analyze(net.eval(), x).group("a").prunable


def test_model_that_does_not_run_gives_a_capture_error():
    model, _ = ZOO["vgg"]()
    with pytest.raises(CaptureError, match="does not run"):
        sp.analyze(model, torch.randn(1, 5, 32, 32))


def test_untraceable_root_is_reported():
    class Root(nn.Module):
        def forward(self, x):
            for row in x.tolist():  # data-dependent Python in the root itself
                return torch.tensor(row)
    with pytest.raises(CaptureError, match=r"cannot trace Root.forward itself at .*test_capture.py:\d+"):
        sp.analyze(Root(), torch.randn(2, 3))


def test_inplace_slices_the_users_modules():
    model, inputs = ZOO["vgg"]()
    keep = copy.deepcopy(model)
    cg = sp.analyze(model, inputs)
    g = next(g for g in cg.groups if g.prunable)
    pruned = sp.prune_channels(model, inputs, {g.id: [0]}, inplace=True)
    conv = pruned.get_submodule(g.id)
    assert conv is model.get_submodule(g.id) and conv.out_channels == keep.get_submodule(g.id).out_channels - 1


class CachesInForward(nn.Module):
    """Caches a derived tensor in a dict on ``self`` (timm's LeViT attention-bias cache) and
    counts its calls: traced, the cache would hold a Proxy of a finished graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)
        self.cache, self.calls = {}, []

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.scale * 2
        self.calls.append(1)
        self.note = "ran"
        return self.b(self.a(x) * self.cache[key])


def test_tracing_leaves_the_models_python_state_as_it_was():
    model, x = CachesInForward().eval(), (torch.randn(1, 3, 8, 8),)
    model.cache["cpu"] = torch.full((8, 1, 1), 3.0)
    for _ in range(2):  # a second trace must not read a Proxy cached by the first
        cg = sp.analyze(model, x)
    assert list(model.cache) == ["cpu"] and isinstance(model.cache["cpu"], torch.Tensor)
    assert model.calls == [] and not hasattr(model, "note")
    drop = {next(g for g in cg.groups if "a" in g.producers).id: [2, 5]}
    pruned = sp.prune_channels(model, x, drop)
    ref = sp.masked(model, x, drop)
    assert torch.allclose(pruned(*x), ref(*x), atol=1e-6)


class RecomputesBuffer(nn.Module):
    """ConViT's GPSA: recomputes a buffer when the input size changes (the check
    specialises on the shape), and holds children."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(8, 8, 1)
        self.register_buffer("table", torch.zeros(1, 1, 1, 1), persistent=False)

    def forward(self, x):
        if self.table.shape[-1] != x.shape[-1]:
            self.table = torch.ones(1, 1, 1, int(x.shape[-1]))
        return self.proj(x) * self.table


@pytest.mark.parametrize("leaf", [False, True])
def test_forward_that_rewrites_a_buffer_leaves_the_users_module_alone(leaf):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RecomputesBuffer(), nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    table = model[1].table
    cg = sp.analyze(model, x, leaf_modules=[RecomputesBuffer] if leaf else ())
    assert cg.untraced == []  # the shape check specialises; as a leaf it runs on a private copy
    assert (cg.gm.get_submodule("1").table.shape == (1, 1, 1, 8)) != leaf
    assert model[1].table is table and table.device.type == "cpu" and table.shape == (1, 1, 1, 1)
    assert torch.equal(sp.masked(model, x, {})(*x), model(*x))


class OptionalMask(nn.Module):
    """hiera's ``forward(x, mask=None)``: traced as a Proxy, ``mask is not None`` is true and
    the mask branch would be captured; called with one input it never runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None, scale: float = 2.0):
        x = torch.relu(self.a(x))
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, *x.shape[2:])
        return self.b(x) * scale


def test_forward_defaults_past_the_inputs_are_traced_at_their_defaults():
    model, x = OptionalMask().eval(), (torch.randn(2, 3, 8, 8),)
    cg = sp.analyze(model, x)
    assert not any(n.target == "view" for n in cg.gm.graph.nodes)
    drop = {next(g for g in cg.groups if "a" in g.producers).id: [1, 6]}
    pruned = sp.prune_channels(model, x, drop)
    assert torch.allclose(pruned(*x), sp.masked(model, x, drop)(*x), atol=1e-6)
    assert pruned.a.out_channels == 6


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "untraceable"])
def test_captured_module_generates_its_code_on_first_use_and_then_runs_the_model(name):
    """Capture leaves code generation to the first call (the pipeline only interprets and
    forks the graph); calling the module, reading ``.code``, printing, copying and pickling
    must still work and compute what the model computes."""
    import pickle
    model, inputs = ZOO[name]()
    model.eval()
    gm = capture(model, inputs)
    from torch.fx._lazy_graph_module import _LazyGraphModule
    assert isinstance(gm, _LazyGraphModule) and type(gm)._needs_recompile()  # nothing generated yet
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        want = model(*inputs)
        assert torch.equal(gm(*inputs), want)
        assert "def forward" in gm.code and "def forward" in str(gm)
        assert torch.equal(twin(*inputs), want)
        assert torch.equal(pickle.loads(pickle.dumps(gm))(*inputs), want)


class TypeChecked(nn.Module):
    """Python that asks whether a value is a tensor, as HF output filtering and many
    forwards do: traced, the answer must be the real run's (a Proxy is no Tensor)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y * 2 if isinstance(y, torch.Tensor) else y  # taken in the real run
        outs = {"logits": self.b(y), "count": 3, "none": None}
        tensors = tuple(v for v in outs.values() if isinstance(v, torch.Tensor))
        return tensors + tuple(v for v in outs.values() if torch.is_tensor(v))


def test_type_checks_in_the_models_code_answer_as_the_real_run():
    model, x = TypeChecked().eval(), torch.randn(1, 3, 12, 12)
    gm = capture(model, (x,))
    want, got = model(x), gm(x)
    assert len(got) == len(want) == 2  # a Proxy answered "no tensor": () was traced
    assert all(torch.allclose(w, g) for w, g in zip(want, got))
    assert not isinstance(torch.fx.Proxy(gm.graph.output_node()), torch.Tensor)  # outside a trace: as before
    cg = sp.analyze(model, (x,))
    drop = {g.id: [0, 1] for g in cg.groups if g.prunable}
    assert drop
    ref, out = sp.masked(model, (x,), drop)(x), sp.prune_channels(model, (x,), drop)(x)
    assert all(torch.allclose(r, o, atol=1e-6) for r, o in zip(ref, out))


class HooksOnFirstCall(nn.Module):
    """As Hugging Face's output recording: the first forward registers hooks that collect
    every block's output and marks the model; later forwards read what they collected."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                    for c in (3, 8))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        if not getattr(self, "_hooked", False):
            for b in self.blocks:
                b.register_forward_hook(lambda m, args, out: self._seen.append(out))
            self._hooked = True
        self._seen = []
        for b in self.blocks:
            x = b(x)
        return self.head(torch.cat(self._seen, 1))


def test_hooks_a_forward_registers_are_removed_with_the_state_it_wrote():
    model, x = HooksOnFirstCall().eval(), torch.randn(1, 3, 8, 8)
    hooks = [len(b._forward_hooks) for b in model.blocks]
    for _ in range(2):  # a second analysis traces the same model as the first did
        cg = sp.analyze(model, (x,))
        assert [len(b._forward_hooks) for b in model.blocks] == hooks and not hasattr(model, "_hooked")
        assert torch.allclose(cg.gm(x), model(x))
        del model._hooked, model._seen  # the real forward above hooked the model: back to unhooked
        for b in model.blocks:
            b._forward_hooks.clear()


def test_a_wrapped_function_may_edit_its_list_argument():
    """fx stores a call's list arguments immutably; the generated code passes fresh lists,
    and so must every interpreter of the graph (shapes after surgery, the masked reference)."""
    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.bn(self.a(x)))) * _window(x.new_ones(1), [16, 7])

    model, x = Windowed().eval(), torch.randn(1, 3, 8, 8)
    cg = sp.analyze(model, (x,))
    assert any(n.target is _window for n in cg.gm.graph.nodes)
    pruned, result = sp.prune_one_shot(model, (x,), 0.3, round_to=None)
    assert result.achieved_ratio > 0 and torch.allclose(cg.gm(x), model(x))


def test_dtype_limits_of_a_traced_value_are_read_as_in_the_real_run():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            big = torch.finfo(y.dtype).max - torch.iinfo(torch.int8).max  # RT-DETR's anchors, HF's clamps
            return self.b(torch.where(y > 0, y, torch.full((), big, dtype=y.dtype)).clamp(max=1.0))

    model, x = Clamped().eval(), torch.randn(1, 3, 8, 8)
    gm = capture(model, (x,))
    assert not gm.meta["untraced"] and torch.allclose(gm(x), model(x))
    assert torch.finfo is torch.finfo(torch.float32).__class__  # restored after the trace


def test_check_capture_compares_the_trace_with_the_model():
    class Diverging(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.a(x)
            return y * 2 if type(y) is torch.Tensor else y - 1  # a Proxy's type is not Tensor

    x = torch.randn(1, 3, 8, 8)
    model = TypeChecked().eval()
    assert sp.analyze(model, (x,)).check_capture(model) <= 1e-6
    model = Diverging().eval()
    with pytest.raises(CaptureError, match="does not compute what Diverging computes"):
        sp.analyze(model, (x,)).check_capture(model)
    with pytest.raises(CaptureError, match="does not compute what Diverging computes"):
        sp.prune_one_shot(model, (x,), 0.3, check_capture=True)


def test_check_capture_leaves_what_a_forward_caches_as_it_was():
    from ops.test_surgery_check import CachedAnchors
    model, x = CachedAnchors().eval(), torch.randn(1, 3, 6, 6)
    sp.analyze(model, (x,)).check_capture(model)
    assert model.anchors is None  # the real forward cached them; the check undid it


LIBRARY = '''
import torch
import torch.nn.functional as F


def windowed(x, size):
    """Python on shapes, as torchvision's Swin window attention: plain fx cannot trace it."""
    pad = (size - x.shape[-1] % size) % size
    return F.pad(x, (0, pad)).relu()[..., :x.shape[-1]]


torch.fx.wrap("windowed")
'''


def test_an_installed_librarys_wrapped_function_is_traced_through(tmp_path, monkeypatch):
    """A library's ``torch.fx.wrap``ed function without a rule is traced through (its ops
    have rules), so the channels it passes stay prunable; the user's own wraps stay opaque."""
    lib = tmp_path / "site-packages" / "fakelib_wraps"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    import fakelib_wraps

    class UsesLibrary(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(fakelib_wraps.windowed(self.bn(self.a(x)), 3))

    model, x = UsesLibrary().eval(), torch.randn(1, 3, 8, 8)
    cg = sp.analyze(model, (x,))
    assert not any(n.target is fakelib_wraps.windowed for n in cg.gm.graph.nodes)
    assert next(g for g in cg.groups if "a" in g.producers).prunable
    assert cg.check_capture(model) <= 1e-6
    drop = {next(g for g in cg.groups if "a" in g.producers).id: [1, 5]}
    assert torch.allclose(sp.masked(model, (x,), drop)(x), sp.prune_channels(model, (x,), drop)(x), atol=1e-6)
