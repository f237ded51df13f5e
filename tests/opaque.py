"""An op the registry can never know: "the op with no rule" in tests.

``opaque(x)`` rolls the channel axis by one (so pruning through it would be wrong) and is
a leaf for torch.fx. ``torch.fx.wrap`` patches the globals of the module that calls it, so
each test module that uses the op wraps its own name::

    from opaque import opaque
    torch.fx.wrap("opaque")
"""
import torch


def opaque(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 1, 1)


torch.fx.wrap("opaque")
