"""softprune-fx: Operation-Aware Soft Channel Pruning as a torch.fx compiler pass."""
from softprune_fx.passes.errors import (BudgetError, CaptureError, IllegalDropError, OnnxExportError, SoftpruneError,
                           SurgeryError)
from softprune_fx.passes.registry import register_op

from .api import analyze, masked, prune_channels
from .graph import ChannelGraph
from .pruner import PruneResult, SoftPruner, prune_one_shot
from .scp import SCPConfig
from .plan_io import apply_plan, make_plan
from .verify_api import VerifyResult, verify_artifacts

__all__ = ["SoftPruner", "prune_one_shot", "PruneResult", "SCPConfig", "analyze", "masked", "prune_channels", "register_op", "ChannelGraph", "SoftpruneError",
           "CaptureError", "IllegalDropError", "SurgeryError", "BudgetError", "OnnxExportError"]
__all__ += ["apply_plan", "make_plan", "verify_artifacts", "VerifyResult"]
__version__ = "0.1.0"
