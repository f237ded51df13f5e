"""Activation dead thresholds in the op registry, against values worked out by hand.

Each smooth threshold is re-derived here with ``math`` only (Newton on the hand formula of
the activation), independent of the registry's torch grid and bisection.
"""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from opaque import opaque
from softprune_fx.passes.ops import dead_threshold, exact_zero_threshold

torch.fx.wrap("opaque")


def phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


HAND = {  # f(y) by hand, for the equation f(t) = -+delta
    "silu": lambda y: y / (1.0 + math.exp(-y)),
    "mish": lambda y: y * math.tanh(math.log1p(math.exp(y))),
    "gelu": lambda y: y * phi(y),
    "gelu_tanh": lambda y: 0.5 * y * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3))),
}


def newton(f, target: float, t: float) -> float:
    """Solve f(t) = target by Newton with a central-difference slope."""
    for _ in range(60):
        h = 1e-6
        t -= (f(t) - target) / ((f(t + h) - f(t - h)) / (2 * h))
    return t


def one_node(fn, *modules):
    """The traced node that calls ``fn`` (a module is wrapped as the model's child m)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if modules:
                self.m = modules[0]

        def forward(self, x):
            return fn(self, x)
    gm = fx.symbolic_trace(Net())
    node = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")][-1]
    return node, dict(gm.named_modules())


def thr(fn, *modules, delta=0.05):
    node, mods = one_node(fn, *modules)
    return dead_threshold(node, mods, delta)


# --------------------------------------------------------------------------- exact zero regions

EXACT = [
    (lambda s, x: s.m(x), nn.ReLU(), 0.0), (lambda s, x: s.m(x), nn.ReLU(inplace=True), 0.0),
    (lambda s, x: s.m(x), nn.ReLU6(), 0.0), (lambda s, x: F.relu(x), None, 0.0),
    (lambda s, x: F.relu(x, inplace=True), None, 0.0), (lambda s, x: F.relu_(x), None, 0.0),
    (lambda s, x: F.relu6(x), None, 0.0), (lambda s, x: torch.relu(x), None, 0.0),
    (lambda s, x: torch.relu_(x), None, 0.0), (lambda s, x: x.relu(), None, 0.0),
    (lambda s, x: x.relu_(), None, 0.0),
    (lambda s, x: s.m(x), nn.Hardswish(), -3.0), (lambda s, x: F.hardswish(x), None, -3.0),
    (lambda s, x: F.hardswish(x, inplace=True), None, -3.0),
    (lambda s, x: s.m(x), nn.Hardsigmoid(), -3.0), (lambda s, x: F.hardsigmoid(x), None, -3.0),
]


@pytest.mark.parametrize("fn,module,t", EXACT)
def test_exact_zero_regions(fn, module, t):
    got = thr(fn, *([module] if module is not None else []))
    assert got == t
    assert thr(fn, *([module] if module is not None else []), delta=0.3) == t  # delta does not apply


@pytest.mark.parametrize("act,t", [(nn.ReLU(), 0.0), (nn.ReLU6(), 0.0), (nn.Hardswish(), -3.0),
                                   (nn.Hardsigmoid(), -3.0)])
def test_exact_regions_are_real(act, t):
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    assert torch.all(act(x[x <= t]) == 0)
    assert torch.all(act(x[x > t + 1e-9]) != 0)  # the region ends at t


def test_exact_zero_threshold_for_objects():
    """What scp.rectifier_threshold reports: exact regions only, by module, class, function, name."""
    assert [exact_zero_threshold(o) for o in (nn.ReLU(), nn.ReLU6, F.relu6, torch.relu_, "relu_")] == [0.0] * 5
    assert [exact_zero_threshold(o) for o in (nn.Hardswish, F.hardswish, nn.Hardsigmoid())] == [-3.0] * 3
    assert [exact_zero_threshold(o) for o in (nn.SiLU(), F.gelu, torch.sigmoid, nn.LeakyReLU, None, 3)] == [None] * 6


# --------------------------------------------------------------------------- smooth tails


@pytest.mark.parametrize("fn,module,hand,approx", [
    (lambda s, x: s.m(x), nn.SiLU(), "silu", -4.4853),
    (lambda s, x: F.silu(x, inplace=True), None, "silu", -4.4853),
    (lambda s, x: s.m(x), nn.Mish(), "mish", -4.4925),
    (lambda s, x: F.mish(x), None, "mish", -4.4925),
    (lambda s, x: s.m(x), nn.GELU(), "gelu", -1.9489),
    (lambda s, x: F.gelu(x), None, "gelu", -1.9489),
    (lambda s, x: s.m(x), nn.GELU(approximate="tanh"), "gelu_tanh", -1.9483),
    (lambda s, x: F.gelu(x, approximate="tanh"), None, "gelu_tanh", -1.9483),
])
def test_negative_tails_by_hand(fn, module, hand, approx):
    """SiLU: t / (1 + e^-t) = -0.05 at t = -4.4853 (e^4.4853 = 88.70, 4.4853 / 89.70 = 0.0500);
    GELU: t Phi(t) = -0.05 at t = -1.9489 (Phi(-1.9489) = 0.02566, times 1.9489 = 0.0500)."""
    t = thr(fn, *([module] if module is not None else []))
    assert t == pytest.approx(approx, abs=1e-4)
    assert t == pytest.approx(newton(HAND[hand], -0.05, approx), abs=1e-7)
    assert abs(HAND[hand](t - 1e-3)) < 0.05 < abs(HAND[hand](t + 1e-3))


def test_sigmoid_and_softplus_closed_forms():
    """sigmoid(t) = delta: t = log(delta / (1 - delta)) = -2.9444; softplus(t) = delta:
    t = log(e^delta - 1) / beta (beta = 1: -2.9706; beta = 2: log(e^0.1 - 1) / 2 = -1.1261)."""
    d = 0.05
    sig = math.log(d / (1 - d))
    for fn, mods in [(lambda s, x: s.m(x), [nn.Sigmoid()]), (lambda s, x: torch.sigmoid(x), []),
                     (lambda s, x: F.sigmoid(x), []), (lambda s, x: x.sigmoid(), []),
                     (lambda s, x: x.sigmoid_(), []), (lambda s, x: torch.special.expit(x), [])]:
        assert thr(fn, *mods) == pytest.approx(sig, abs=1e-9)
    assert sig == pytest.approx(-2.9444, abs=1e-4)
    assert thr(lambda s, x: s.m(x), nn.Softplus()) == pytest.approx(math.log(math.expm1(d)), abs=1e-9)
    assert thr(lambda s, x: F.softplus(x)) == pytest.approx(-2.9706, abs=1e-4)
    assert thr(lambda s, x: s.m(x), nn.Softplus(beta=2.0)) == pytest.approx(-1.1261, abs=1e-4)
    assert thr(lambda s, x: F.softplus(x, 2.0)) == pytest.approx(math.log(math.expm1(2 * d)) / 2, abs=1e-9)


def test_delta_is_a_parameter():
    """Smaller delta, deeper threshold: SiLU at 0.01 solves t / (1 + e^-t) = -0.01 (t = -6.5)."""
    t = thr(lambda s, x: s.m(x), nn.SiLU(), delta=0.01)
    assert t == pytest.approx(newton(HAND["silu"], -0.01, -6.0), abs=1e-7)
    assert t < thr(lambda s, x: s.m(x), nn.SiLU())
    assert thr(lambda s, x: torch.sigmoid(x), delta=0.2) == pytest.approx(math.log(0.2 / 0.8), abs=1e-9)


@pytest.mark.parametrize("fn,mods", [
    (lambda s, x: s.m(x), [nn.LeakyReLU()]), (lambda s, x: s.m(x), [nn.PReLU()]),
    (lambda s, x: s.m(x), [nn.ELU()]), (lambda s, x: s.m(x), [nn.SELU()]),
    (lambda s, x: s.m(x), [nn.Tanh()]), (lambda s, x: s.m(x), [nn.Identity()]),
    (lambda s, x: F.leaky_relu(x), []), (lambda s, x: F.elu(x), []), (lambda s, x: torch.tanh(x), []),
    (lambda s, x: x + 1, []), (lambda s, x: opaque(x), []),
])
def test_no_dead_region(fn, mods):
    assert thr(fn, *mods) is None


def test_runtime_argument_gives_none():
    """A softplus beta known only at run time: no threshold rather than a guess."""
    assert thr(lambda s, x: F.softplus(x, x.shape[1] * 1.0)) is None


def test_bn_sites_read_the_registry():
    """A BN before SiLU is a BN site with SiLU's threshold; before LeakyReLU it is none."""
    import softprune_fx as sp
    from softprune_fx.bnsites import find_bn_sites

    def net(act):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act, nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    cg = sp.analyze(net(nn.SiLU()), x)
    sites = find_bn_sites(cg, cg.index)
    assert [s.gamma for s in sites] == ["1.weight"]
    assert sites[0].threshold == pytest.approx(-4.4853, abs=1e-4)
    assert find_bn_sites(cg, cg.index, delta=0.01)[0].threshold == pytest.approx(newton(HAND["silu"], -0.01, -6.0))
    cg = sp.analyze(net(nn.LeakyReLU()), x)
    assert find_bn_sites(cg, cg.index) == []
