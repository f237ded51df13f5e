"""The test zoo: hand-written architectures, one per coupling kind (DESIGN.md s. 3, 8).

ZOO maps a name to a builder returning (model_in_eval_mode, example_inputs_tuple); every
builder is deterministic and small (widths 4..32, 8..32 px, batch 2). BIG holds the
full-size benchmark models (224 px, batch 1), kept out of ZOO.

Files: zoo_common (helpers, `randomize_norms`), zoo_cnn (VGG, ResNets, DenseNet,
Inception, 1d/3d), zoo_mobile (MobileNets, EfficientNet, ShuffleNets), zoo_modern
(ConvNeXt, Res2Net, CBAM, FPN), zoo_misc (special cases, misc_* op exercisers), zoo_big.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

try:
    from .zoo_activations import ZOO_ACTIVATIONS
    from .zoo_attention import ZOO_ATTENTION
    from .zoo_big import BIG
    from .zoo_cnn import ZOO_CNN
    from .zoo_common import randomize_norms
    from .zoo_ecosystem import PLAIN_FX_FAILS, ZOO_ECOSYSTEM
    from .zoo_misc import ZOO_MISC
    from .zoo_mobile import ZOO_MOBILE
    from .zoo_modern import ZOO_MODERN
except ImportError:  # imported with tests/ on sys.path
    from zoo_activations import ZOO_ACTIVATIONS
    from zoo_attention import ZOO_ATTENTION
    from zoo_big import BIG
    from zoo_cnn import ZOO_CNN
    from zoo_common import randomize_norms
    from zoo_ecosystem import PLAIN_FX_FAILS, ZOO_ECOSYSTEM
    from zoo_misc import ZOO_MISC
    from zoo_mobile import ZOO_MOBILE
    from zoo_modern import ZOO_MODERN

Builder = Callable[[], "tuple[nn.Module, tuple]"]

ZOO: dict[str, Builder] = {**ZOO_CNN, **ZOO_MOBILE, **ZOO_MODERN, **ZOO_MISC, **ZOO_ECOSYSTEM, **ZOO_ACTIVATIONS,
                          **ZOO_ATTENTION}

#: models on which torch.fx.symbolic_trace is expected to fail
UNTRACEABLE = frozenset({"untraceable", "vit_sdpa"}) | PLAIN_FX_FAILS  # vit_sdpa: view(*proxy)

__all__ = ["BIG", "UNTRACEABLE", "ZOO", "randomize_norms"]
