"""Sanity of the test zoo and the random-architecture generator: every model runs in eval
mode, is deterministic, has randomised norms, and traces with torch.fx (except
`untraceable`, which must fail to trace)."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

try:
    from .randarch import random_model
    from .zoo import BIG, UNTRACEABLE, ZOO
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from randarch import random_model
    from zoo import BIG, UNTRACEABLE, ZOO

REQUIRED = {
    "vgg", "resnet_basic", "resnet_bottleneck", "resnet_cifar_a", "preact_resnet", "resnext",
    "mobilenetv2", "mobilenetv3", "efficientnet", "densenet", "inception", "shufflenetv2",
    "shufflenet_module", "convnext", "res2net", "cbam", "fpn", "untraceable", "functional_bn",
    "multi_io", "conv1d", "conv3d", "glu", "pixel_shuffle",
}
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the thread
    barriers cost 10x; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _leaves(out):
    return tree_flatten(out)[0]


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_zoo_has_required_entries():
    assert REQUIRED <= set(ZOO)
    assert any(k.startswith("misc_") for k in ZOO)
    assert not set(BIG) & set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name):
    model, inputs = ZOO[name]()
    assert isinstance(inputs, tuple) and all(torch.is_tensor(x) for x in inputs)
    assert not any(m.training for m in model.modules()), "builder must return eval mode"
    assert sum(p.numel() for p in model.parameters()) < 100_000, "zoo models must be small"

    out = _run(model, inputs)
    assert all(torch.isfinite(t).all() for t in _leaves(out))

    # deterministic: a second build gives the same weights, inputs and outputs
    model2, inputs2 = ZOO[name]()
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    assert all(torch.equal(a, b) for a, b in zip(_leaves(out), _leaves(_run(model2, inputs2))))

    # norms are randomised (affine and running stats), so comparisons are sharp
    for m in model.modules():
        if isinstance(m, NORMS) and getattr(m, "weight", None) is not None:
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))
        if isinstance(m, NORMS) and getattr(m, "running_var", None) is not None:
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))

    if name in UNTRACEABLE:
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(model)
        return
    gm = torch.fx.symbolic_trace(model)
    traced = _leaves(_run(gm, inputs))
    assert len(traced) == len(_leaves(out))
    assert all(torch.equal(a, b) for a, b in zip(_leaves(out), traced))


def test_channel_shuffle_module_matches_view_transpose():
    (m1, x1), (m2, x2) = ZOO["shufflenetv2"](), ZOO["shufflenet_module"]()
    assert torch.equal(_run(m1, x1), _run(m2, x2))


@pytest.mark.parametrize("seed", range(20))
def test_random_arch(seed):
    model, inputs = random_model(seed)
    assert not any(m.training for m in model.modules())
    out = _run(model, inputs)
    assert out.shape == (inputs[0].shape[0], 10) and torch.isfinite(out).all()
    gm = torch.fx.symbolic_trace(model)
    assert torch.equal(_run(gm, inputs), out)
    again, inputs2 = random_model(seed)
    assert torch.equal(_run(again, inputs2), out)


@pytest.mark.parametrize("name,params", [("resnet50", 25_557_032),
                                         ("mobilenetv2_full", 3_504_872),
                                         ("densenet121", 7_978_856)])
def test_big_models(name, params):
    """Full-size models have torchvision's parameter counts, trace, and run (at 64 px
    here to keep the test fast; benchmarks use the 224 px example input)."""
    model, inputs = BIG[name]()
    assert sum(p.numel() for p in model.parameters()) == params
    assert inputs[0].shape == (1, 3, 224, 224)
    gm = torch.fx.symbolic_trace(model)
    assert _run(gm, (inputs[0][:, :, :64, :64],)).shape == (1, 1000)
