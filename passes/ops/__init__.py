"""The op registry's entries, by family; importing this package loads every entry.

Registry functions are re-exported so callers need one import::

    from softprune_fx.passes.ops import dead_threshold, lookup
"""
from .. import rules_core, rules_mixing, rules_shape  # noqa: F401  (they fill the registry)
from ..registry import (OpEntry, SmallTail, ZeroBelow, dead_threshold, describe, entry_of,  # noqa: F401
                        exact_zero_threshold, lookup, node_arg, register, register_name, register_op)
