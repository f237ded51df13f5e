"""softprune-fx: Operation-Aware Soft Channel Pruning as a torch.fx compiler pass.

Names are imported lazily (PEP 562), so ``import softprune_fx`` stays cheap: rich,
networkx, onnxruntime and torch.distributed load only when the API that needs them is
first used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SoftPruner": ".pruner", "prune_one_shot": ".oneshot", "PruneResult": ".finish",
    "SCPConfig": ".scp",
    "analyze": ".api", "masked": ".api", "prune_channels": ".api",
    "ChannelGraph": ".graph",
    "apply_plan": ".plan_io", "make_plan": ".plan_io",
    "verify_artifacts": ".verify_api", "VerifyResult": ".verify_api",
    "register_op": ".passes.registry",
    "SoftpruneError": ".passes.errors", "CaptureError": ".passes.errors",
    "IllegalDropError": ".passes.errors", "SurgeryError": ".passes.errors",
    "BudgetError": ".passes.errors", "OnnxExportError": ".passes.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softprune_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
