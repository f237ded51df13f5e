"""Example inputs as a tuple of positional arguments (capture and flops both need it;
a module of its own so neither imports the other for it)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

Inputs = torch.Tensor | Sequence[torch.Tensor]


def as_inputs(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs to a tuple of positional arguments.

    Example:
        >>> len(as_inputs(torch.zeros(1))), len(as_inputs([torch.zeros(1), torch.zeros(2)]))
        (1, 2)
    """
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)  # a bare tensor (or any single object) is one argument
