"""The records a channel rule produces: mask sites, constraints, and special layouts.

They live apart from the walker (``flow``) so that op rules can import them freely.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx


@dataclass
class Site:
    """An input of an op that mixes channels (or reads them as a whole, exactly)."""

    node: fx.Node
    arg: int | str
    atoms: np.ndarray       # 1-D: the atom at each position along ``axis``
    axis: int
    kind: str = "conv"      # conv, linear, matmul, reduce, layer_norm
    fill: float = 0.0       # what hard masks write at dropped positions


@dataclass
class Balance:
    """Positions split into ``blocks`` equal contiguous blocks keep equal counts (grouped conv)."""

    atoms: np.ndarray
    blocks: int
    where: str
    site: Site | None = None


@dataclass
class Grid:
    """A channel axis reshaped into a grid: a column (last axis) is kept whole or dropped whole."""

    layout: np.ndarray
    where: str


@dataclass
class NonEmpty:
    """At least one of these positions stays (a split piece, a conv's input)."""

    atoms: np.ndarray
    where: str
    site: Site | None = None


@dataclass
class ChannelCount:
    """A Python number that is (or derives from) the extent of a channel axis.

    Shape arguments (view sizes, split sizes) may use it: they follow the pruned extent.
    Arithmetic on tensors may not: the number would change after pruning, so the atoms
    of that axis are frozen there. ``pure``: it derives from channel extents and constants
    alone (``C // heads``, not ``B * C`` or ``numel``), so it is the same for every input and
    surgery may write the pruned value in its place.
    """

    atoms: np.ndarray
    pure: bool = True


@dataclass
class ParamRef:
    """The lazy layout of a ``get_attr`` tensor: materialised when an op reads it."""

    target: str
    value: torch.Tensor
