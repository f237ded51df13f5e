"""Shared test setup: the zoo on sys.path, one torch thread (2-core CI), strict mode
(a rule that raises fails its test instead of freezing channels; subprocesses inherit it
through SOFTPRUNE_STRICT), helpers."""
import os
import sys
import tempfile

os.environ["SOFTPRUNE_STRICT"] = "1"
# latency tables a benchmark left in the user's cache would change round_to="auto"'s widths
# (it reads cached tables): the suite gets an empty cache of its own, subprocesses too
os.environ["SOFTPRUNE_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="softprune-test-latency-")

import pytest  # noqa: E402
import torch  # noqa: E402

from softprune_fx.passes.flow import set_strict  # noqa: E402

set_strict(True)
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
