"""Shared test setup: the zoo on sys.path, one torch thread (2-core CI), helpers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from drops import random_drop  # noqa: E402,F401 (re-exported to the tests)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outputs(model, inputs):
    from softprune_fx.onnx_check import flatten_outputs
    with torch.no_grad():
        return [t for _, t in flatten_outputs(model(*inputs))]


def rel_err(ref, got) -> float:
    return max(((a - b).abs().max() / max(1.0, a.abs().max().item())).item() for a, b in zip(ref, got))
