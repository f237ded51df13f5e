"""One small model per registry key: conv ``a`` (3 -> 8) -> the op -> a lazy mixing layer.

``check(key, op, expect)`` traces it, asserts that the op's node resolves to the entry
registered under ``key`` (so the test exercises that key, not a neighbour), then either
the invariant (masked == pruned for random legal drops, float64) where ``expect`` is True,
or that ``a``'s channels are frozen with a reason containing ``expect``.
"""
import torch
from conftest import outputs, random_drop, rel_err
from torch import nn

import softprune_fx as sp
from softprune_fx.passes.registry import _BY_NAME, _REGISTRY, lookup

HEADS = {2: lambda: nn.LazyLinear(4), 3: lambda: nn.LazyConv1d(4, 1), 4: lambda: nn.LazyConv2d(4, 1),
         5: lambda: nn.LazyConv3d(4, 1)}


class Net(nn.Module):
    def __init__(self, op, module=None):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.op, self.m = op, module
        self.b = None

    def forward(self, x):
        return self.b(self.op(self, self.a(x)))


def build(op, module=None, size=8):
    torch.manual_seed(0)
    net = Net(op, module.double() if module is not None else None)
    x = (torch.randn(2, 3, size, size, dtype=torch.float64),)
    with torch.no_grad():
        y = op(net, net.a.double()(x[0]))
    net.b = HEADS[y.dim()]()
    net = net.double()
    net(*x)  # materialise the lazy head
    return net.eval(), x


def entry_for(key):
    return _BY_NAME[key] if isinstance(key, str) and key in _BY_NAME else _REGISTRY[key]


def check(key, op, expect=True, module=None, size=8, seeds=2):
    net, x = build(op, module, size)
    cg = sp.analyze(net, x)
    modules = dict(cg.gm.named_modules())
    entry = entry_for(key)
    assert any(lookup(n, modules) is entry for n in cg.gm.graph.nodes), f"no node resolves to {key!r}"
    group = next(g for g in cg.groups if "a" in g.producers)
    if expect is not True:
        assert not group.prunable and expect in group.frozen_reason, group.frozen_reason
        return cg
    assert group.prunable, group.frozen_reason
    dropped = 0
    for seed in range(seeds):
        drop = random_drop(cg, seed)
        dropped += sum(map(len, drop.values()))
        err = rel_err(outputs(cg.masked(drop), x), outputs(cg.prune(drop), x))
        assert err <= 1e-12, (key, err)
    assert dropped > 0, "the random drops dropped nothing"
    return cg


def case_ids(cases) -> list[str]:
    """Readable pytest ids for a table of ``(key, op, module, expect)`` cases: index and key name."""
    def name(key):
        return key if isinstance(key, str) else getattr(key, "__qualname__", None) or getattr(key, "__name__", repr(key))
    return [f"{i}-{name(c[0])}" for i, c in enumerate(cases)]
