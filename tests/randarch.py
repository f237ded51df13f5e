"""Random-architecture generator: small random DAG CNNs no one wrote by hand.

`random_model(seed)` draws a plan (a fixed tuple of op descriptors) at construction
time; `RandomNet.forward` walks it, so torch.fx traces it into a plain graph. Ops:
conv (kernel 1/3; dense, grouped or depthwise, incl. a channel multiplier), BN,
activations, residual add, cat / chunk / split on dim 1, SE gate, channel shuffle by
view/transpose, max/avg pooling, ShuffleNet units (v2: chunk, branch, cat, shuffle; v1:
grouped 1x1, shuffle, depthwise, grouped 1x1, add); head = adaptive pool to 1x1 or 2x2 +
flatten + Linear (the 2x2 head repeats each channel over 4 features).

``random_model(seed, tiny=True)`` draws 1-4 steps of 2-4 channel values: graphs small
enough to enumerate every drop (the legalize contract tests).
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

try:
    from .zoo_common import BATCH, channel_shuffle, randomize_norms
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, channel_shuffle, randomize_norms

MIN_W, MAX_W = 4, 24
ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU)


class SE(nn.Module):
    """Squeeze-excitation gate: pool -> 1x1 -> ReLU -> 1x1 -> sigmoid, times x."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(2, c // 4), 1)
        self.fc2 = nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x):
        s = torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))
        return x * torch.sigmoid(self.fc2(s))


class RandomNet(nn.Module):
    """Executes `plan`: each step is (kind, source value indices, module key, arg) and
    appends its result(s) to the list of values. The head pools every value nobody else
    read (`leaves`, so no branch is dead), cats them, flattens, and applies a Linear."""

    def __init__(self, plan, mods: dict[str, nn.Module], leaves, c_out: int, classes: int = 10, head: int = 1):
        super().__init__()
        self.plan = tuple(plan)
        self.leaves = tuple(leaves)
        self.mods = nn.ModuleDict(mods)
        self.pool = nn.AdaptiveAvgPool2d(head)
        self.fc = nn.Linear(c_out * head * head, classes)

    def forward(self, x):
        vals = [x]
        for kind, srcs, key, arg in self.plan:
            a = vals[srcs[0]]
            if kind == "mod":
                vals.append(self.mods[key](a))
            elif kind == "add":
                vals.append(a + vals[srcs[1]])
            elif kind == "cat":
                vals.append(torch.cat([a, vals[srcs[1]]], 1))
            elif kind == "chunk":
                parts = torch.chunk(a, 2, 1)
                vals.append(parts[0])
                vals.append(parts[1])
            elif kind == "split":
                parts = torch.split(a, list(arg), 1)
                vals.append(parts[0])
                vals.append(parts[1])
            elif kind == "shuffle":
                vals.append(channel_shuffle(a, arg))
            elif kind == "relu":
                vals.append(torch.relu(a))
        feats = [self.pool(vals[i]) for i in self.leaves]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, 1)
        return self.fc(torch.flatten(x, 1))


class _Builder:
    """Draws the plan while tracking each value's (channels, spatial size)."""

    def __init__(self, rng: random.Random, size: int, widths: tuple[int, int] = (4, 24)):
        self.rng = rng
        self.min_w, self.max_w = widths
        self.plan: list[tuple] = []
        self.mods: dict[str, nn.Module] = {}
        self.sigs: dict[str, tuple] = {}  # key -> (c_in or None, c_out or None, halves)
        self.vals: list[tuple[int, int]] = [(3, size)]

    def pick(self, ok=lambda c, h: True):
        """A source value index (never the input), biased towards the newest and then
        towards values nothing reads yet (fewer loose ends for the head)."""
        idx = [i for i, (c, h) in enumerate(self.vals) if i > 0 and ok(c, h)]
        if not idx:
            return None
        if idx[-1] == len(self.vals) - 1 and self.rng.random() < 0.6:
            return idx[-1]
        leaves = set(self.leaves())
        loose = [i for i in idx if i in leaves]
        if loose and self.rng.random() < 0.7:
            return self.rng.choice(loose)
        return self.rng.choice(idx)

    def call(self, src, key):
        cin, cout, halves = self.sigs[key]
        c, h = self.vals[src]
        self.plan.append(("mod", (src,), key, 0))
        self.vals.append((c if cout is None else cout, h // 2 if halves else h))

    def mod(self, src, m, cin=None, cout=None, halves=False):
        key = f"m{len(self.mods)}"
        self.mods[key], self.sigs[key] = m, (cin, cout, halves)
        self.call(src, key)

    def conv(self, src=None):
        src = self.pick() if src is None else src
        cin, h = self.vals[src]
        r, k = self.rng, self.rng.choice((1, 3))
        kind = r.choice(("dense", "dense", "grouped", "depthwise"))
        g = r.choice([g for g in (2, 4) if cin % g == 0] or [1])
        if kind == "depthwise" and src > 0:
            groups, cout = cin, cin * r.choice((1, 1, 2) if 2 * cin <= self.max_w else (1,))
        elif kind == "grouped" and g > 1 and src > 0:
            groups, cout = g, g * r.randint(max(1, self.min_w // g), max(1, self.max_w // g))
        else:
            groups, cout = 1, r.randint(self.min_w, self.max_w)
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=r.random() < 0.3)
        self.mod(src, conv, cin, cout)
        if r.random() < 0.7:
            self.mod(len(self.vals) - 1, nn.BatchNorm2d(cout), cout, cout)
        if r.random() < 0.7:
            self.mod(len(self.vals) - 1, r.choice(ACTS)())

    def reuse(self):
        """Call an existing module again: shared weights (conv, BN, SE: the inputs of
        both calls couple) or a shared parameterless activation/pool (per call)."""
        for _ in range(8):
            key = self.rng.choice(sorted(self.mods))
            cin, _, halves = self.sigs[key]
            src = self.pick(lambda c, h: (cin is None or c == cin) and (not halves or h >= 8))
            if src is not None and src != 0:
                return self.call(src, key)
        return self.conv()

    def step(self):
        r, n = self.rng, len(self.vals)
        op = r.choice(("conv", "conv", "conv", "bn", "act", "add", "cat", "chunk",
                       "split", "se", "shuffle", "pool", "reuse", "unit_v2", "unit_v1"))
        if op == "conv":
            return self.conv()
        if op == "unit_v2":
            return self.unit_v2()
        if op == "unit_v1":
            return self.unit_v1()
        if op == "reuse":
            return self.reuse()
        if op in ("bn", "act", "se"):
            src = self.pick()
            c = self.vals[src][0]
            if op == "act":
                return self.mod(src, r.choice(ACTS)())
            return self.mod(src, nn.BatchNorm2d(c) if op == "bn" else SE(c), c, c)
        if op == "pool":
            src = self.pick(lambda c, h: h >= 8)
            if src is None:
                return self.conv()
            pool = r.choice((nn.MaxPool2d, nn.AvgPool2d))
            return self.mod(src, pool(2, 2), halves=True)
        if op in ("add", "cat"):
            a = self.pick()
            ca, ha = self.vals[a]
            fit = ((lambda c, h: c == ca and h == ha) if op == "add"
                   else (lambda c, h: h == ha and c + ca <= self.max_w))
            others = [i for i in range(1, n) if i != a and fit(*self.vals[i])]
            if not others:  # make a partner: a conv of `a` with the right width
                return self.conv(a)
            leaves = set(self.leaves())
            loose = [i for i in others if i in leaves]
            b = r.choice(loose if loose and r.random() < 0.7 else others)
            self.plan.append((op, (a, b), "", 0))
            self.vals.append((ca if op == "add" else ca + self.vals[b][0], ha))
            return None
        if op == "shuffle":
            src = self.pick(lambda c, h: c % 2 == 0 and c >= 4)
            if src is None:
                return self.conv()
            g = r.choice([g for g in (2, 3, 4) if self.vals[src][0] % g == 0])
            self.plan.append(("shuffle", (src,), "", g))
            self.vals.append(self.vals[src])
            return None
        # chunk / split into two pieces along dim 1
        src = self.pick(lambda c, h: c >= 4 and (op == "split" or c % 2 == 0))
        if src is None:
            return self.conv()
        c, h = self.vals[src]
        first = c // 2 if op == "chunk" else r.randint(2, c - 2)
        self.plan.append((op, (src,), "", 2 if op == "chunk" else (first, c - first)))
        self.vals += [(first, h), (c - first, h)]
        if r.random() < 0.5:  # usually rejoin the pieces, in a random order
            a, b = (n + 1, n) if r.random() < 0.5 else (n, n + 1)
            self.plan.append(("cat", (a, b), "", 0))
            self.vals.append((c, h))
        return None

    def block(self, src, cout, k=1, groups=1, act=True):
        """conv -> BN (-> ReLU) on value ``src``; returns the new value's index."""
        cin = self.vals[src][0]
        self.mod(src, nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), cin, cout)
        self.mod(len(self.vals) - 1, nn.BatchNorm2d(cout), cout, cout)
        if act:
            self.mod(len(self.vals) - 1, nn.ReLU())
        return len(self.vals) - 1

    def unit_v2(self):
        """ShuffleNetV2 unit: chunk, a 1x1 / depthwise 3x3 / 1x1 branch on one half, cat, shuffle."""
        src = self.pick(lambda c, h: c % 2 == 0 and c >= 4)
        if src is None:
            return self.conv()
        c, n = self.vals[src][0], len(self.vals)
        self.plan.append(("chunk", (src,), "", 2))
        self.vals += [(c // 2, self.vals[src][1])] * 2
        b = self.block(n + 1, c // 2)
        b = self.block(b, c // 2, 3, c // 2, act=False)
        b = self.block(b, c // 2)
        self.plan.append(("cat", (n, b), "", 0))
        self.vals.append((c, self.vals[src][1]))
        self.plan.append(("shuffle", (len(self.vals) - 1,), "", 2))
        self.vals.append(self.vals[-1])

    def unit_v1(self):
        """ShuffleNet unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1, add, ReLU."""
        src = self.pick(lambda c, h: c % 2 == 0 and c >= 4)
        if src is None:
            return self.conv()
        c, h = self.vals[src]
        g = self.rng.choice([g for g in (2, 4) if c % g == 0 and c >= 2 * g])
        mid = g * self.rng.randint(1, max(1, self.max_w // g))
        b = self.block(src, mid, 1, g)
        self.plan.append(("shuffle", (b,), "", g))
        self.vals.append(self.vals[b])
        b = self.block(len(self.vals) - 1, mid, 3, mid, act=False)
        b = self.block(b, c, 1, g, act=False)
        self.plan.append(("add", (b, src), "", 0))
        self.vals.append((c, h))
        self.plan.append(("relu", (len(self.vals) - 1,), "", 0))
        self.vals.append((c, h))

    def leaves(self) -> list[int]:
        """Values no step reads (the input excepted), oldest first."""
        used = {i for step in self.plan for i in step[1]}
        return [i for i in range(1, len(self.vals)) if i not in used]


def random_model(seed: int, tiny: bool = False) -> tuple[nn.Module, tuple]:
    """A small random DAG CNN (eval mode, norms randomised) and its example input;
    ``tiny``: 1-4 steps on 2-4 channel values."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    size = rng.choice((8, 12, 16))
    b = _Builder(rng, size, (2, 4) if tiny else (MIN_W, MAX_W))
    b.conv(0)  # stem: dense conv on the input
    for _ in range(rng.randint(1, 4) if tiny else rng.randint(5, 14)):
        b.step()
    leaves = b.leaves()
    head = rng.choice((1, 1, 2))
    model = RandomNet(b.plan, b.mods, leaves, sum(b.vals[i][0] for i in leaves), head=head)
    randomize_norms(model, seed)
    model.eval()
    x = torch.randn((BATCH, 3, size, size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (BATCH, 10) and torch.isfinite(out).all(), f"bad random model {seed}"
    return model, (x,)
