"""Shared test setup: the zoo on sys.path, one torch thread (2-core CI), helpers."""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from passes.errors import IllegalDropError  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def outputs(model, inputs):
    from passes.verify import flatten_outputs
    with torch.no_grad():
        return [t for _, t in flatten_outputs(model(*inputs))]


def rel_err(ref, got) -> float:
    return max(((a - b).abs().max() / max(1.0, a.abs().max().item())).item() for a, b in zip(ref, got))
