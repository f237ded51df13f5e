"""Random legal drops, shared by the tests and the benchmarks (no pytest import here)."""
import random


def random_drop(cg, seed: int, max_frac: float = 0.5, tries: int = 8) -> dict:
    """A random non-empty legal drop: up to ``max_frac`` of each prunable group's free
    channels (at least one channel somewhere), legalized to the nearest legal drop.
    Raises ValueError when the model has no prunable channel or no non-empty legal drop."""
    rng = random.Random(seed)
    groups = [g for g in cg.groups if g.prunable]
    if not groups:
        raise ValueError("no prunable group: nothing to drop")
    for _ in range(tries):
        drop = {}
        for g in groups:
            free = [i for i in range(g.width) if i not in g.frozen_channels]
            k = rng.randint(0, int(len(free) * max_frac))
            if k:
                drop[g.id] = rng.sample(free, k)
        if not drop:
            g = rng.choice(groups)
            drop[g.id] = [rng.choice([i for i in range(g.width) if i not in g.frozen_channels])]
        legal = cg.legalize(drop)
        if legal:
            return legal
    raise ValueError("no non-empty legal drop found")


def fraction_drop(cg, seed: int, frac: float = 0.3) -> dict:
    """``frac`` of every prunable group's free channels (at least one), at random, unlegalized."""
    rng = random.Random(seed)
    drop = {}
    for g in cg.groups:
        free = [i for i in range(g.width) if i not in g.frozen_channels]
        if g.prunable and free:
            drop[g.id] = rng.sample(free, max(1, int(frac * len(free))))
    return drop
