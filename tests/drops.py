"""Random legal drops, shared by the tests and the benchmarks (no pytest import here)."""
import random

from softprune_fx.passes.errors import IllegalDropError


def random_drop(cg, seed: int, max_frac: float = 0.5, tries: int = 8) -> dict:
    """A random legal drop: up to ``max_frac`` of each prunable group's free channels,
    legalized; the fraction halves while legalization refuses."""
    rng = random.Random(seed)
    frac = max_frac
    for _ in range(tries):
        drop = {}
        for g in cg.groups:
            free = [i for i in range(g.width) if i not in g.frozen_channels]
            if not g.prunable or len(free) < 2:
                continue
            k = rng.randint(0, int(len(free) * frac))
            if k:
                drop[g.id] = rng.sample(free, k)
        try:
            return cg.legalize(drop)
        except IllegalDropError:
            frac /= 2
    return {}
