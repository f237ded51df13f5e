"""Zoo entries for SCP beyond rectifiers: examples/digits.py's ResNet with SiLU and with GELU
everywhere (BN sites with smooth dead thresholds), and the BN-free ConvNeXt-style net of
examples/digits_convnext.py (LayerNorm only: every prunable group is gated).

Small variants (one block per stage, 16x16 inputs) of the nets bench_activations trains.
"""
from __future__ import annotations

import sys
from pathlib import Path

_EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

import digits  # noqa: E402
import digits_convnext  # noqa: E402

try:
    from .zoo_common import BATCH, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, finish, seeded


def _resnet(act: str):
    def build():
        seeded()
        return finish(digits.build(blocks=1, act=act), (BATCH, 1, 16, 16))
    build.__name__ = f"digits_resnet_{act}"
    return build


def convnext_ln():
    seeded()
    return finish(digits_convnext.build(dims=(16, 32), depths=(1, 1)), (BATCH, 1, 16, 16))


ZOO_ACTIVATIONS = {"resnet_silu": _resnet("silu"), "resnet_gelu": _resnet("gelu"), "convnext_ln": convnext_ln}
