"""The op registry's entries, by family; importing this package loads every entry.

Families: ``elementwise`` (activations, arithmetic), ``norm``, ``mixing`` (conv, linear,
matmul), ``attention`` (scaled dot-product attention), ``einsum``, ``shape`` (reshape,
permute, cat, shuffles, shape queries; ``sizes`` reads and re-emits reshape sizes),
``slicing`` (split, unbind, roll, flip, narrow, indexing, channel pad), ``reduce``
(pooling, reductions, normalize), and ``params`` where present. Adding an op is one entry
in one of them. Registry functions are re-exported::

    from softprune_fx.passes.ops import dead_threshold, lookup
"""
import importlib.util

from . import attention, einsum, elementwise, mixing, norm, reduce, shape, slicing  # noqa: F401  (they fill the registry)
from ..registry import (FlopsTerm, OpEntry, SmallTail, ZeroBelow, annotate, dead_threshold,  # noqa: F401
                        describe, entry_of, exact_entry, exact_zero_threshold, lookup, node_arg,
                        register, register_name, register_op, registered_keys)

if importlib.util.find_spec(f"{__name__}.params") is not None:
    from . import params  # noqa: F401
