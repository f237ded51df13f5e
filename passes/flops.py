"""FLOPs and parameter counts, as DESIGN.md section 4 defines them.

FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts for one eval-mode
forward of the whole model: conv, linear and matmul at 2 x multiply-accumulates, groups
taken from the weight shape, bias and BatchNorm not counted. The per-keep-set cost model
must reproduce this number exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from .inputs import Inputs, as_inputs  # noqa: F401 (re-exported)


class FlopTotal(TorchDispatchMode):
    """FlopCounterMode's total, from torch's own formulas (``flop_registry``), without its
    per-module breakdown. Why not FlopCounterMode itself: it tracks the module hierarchy
    with global module hooks, which costs as much as the forward of a small pruned net
    (MobileNetV2 at 224 px, one thread: 58 ms counted against 27 ms plain; 40 ms here).
    ``tests/test_cost.py`` checks the two agree on every zoo model.

    Example:
        >>> with FlopTotal() as counter:
        ...     _ = nn.Linear(10, 5)(torch.randn(4, 10))
        >>> counter.total
        400
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def get_total_flops(self) -> int:  # FlopCounterMode's name, so either can be used
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket) or _MORE_WRAPPED.get(func._overloadpacket)
        if formula is not None:
            self.total += int(_apply(formula, args, kwargs, out))
        return out


# CPU attention runs as a fused kernel torch's registry has no formula for (FlopCounterMode
# counts 0 for it on the CPU, and the decomposed bmm's on meta tensors): counted as the
# fused kernels it has, so a count is the same on every device. FlopCounterMode agrees when
# given them: ``FlopCounterMode(custom_mapping=MORE_FORMULAS)``.
MORE_FORMULAS = {getattr(torch.ops.aten, name): flop_registry[torch.ops.aten._scaled_dot_product_flash_attention].__wrapped__
                 for name in ("_scaled_dot_product_flash_attention_for_cpu",) if hasattr(torch.ops.aten, name)}
_MORE_WRAPPED = {op: shape_wrapper(f) for op, f in MORE_FORMULAS.items()}


def _apply(formula, args, kwargs, out):
    """``formula(*args, **kwargs, out_val=out)``. A formula torch registered on shapes (its
    ``shape_wrapper``, which ``tree_map``s every argument) is called on the shapes directly
    when no argument nests tensors: the same function on the same shapes, at a fraction of
    the wrapper's cost (it was half the counted forward's overhead)."""
    raw = getattr(formula, "__wrapped__", None)
    if raw is not None and isinstance(out, torch.Tensor):
        shapes = _flat_shapes(args)
        kw = _flat_shapes(kwargs.values())
        if shapes is not None and kw is not None:
            return raw(*shapes, out_shape=out.shape, **dict(zip(kwargs, kw)))
    return formula(*args, **kwargs, out_val=out)


def _flat_shapes(items):
    """Each tensor replaced by its shape; None when a container holds a tensor."""
    out = []
    for a in items:
        if isinstance(a, torch.Tensor):
            out.append(a.shape)
        elif isinstance(a, (list, tuple, dict)) and any(isinstance(b, torch.Tensor) for b in
                                                         (a.values() if isinstance(a, dict) else a)):
            return None
        else:
            out.append(a)
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode under ``torch.no_grad()``.

    Each submodule's own ``training`` flag is restored afterwards, so a model in train
    mode with some frozen (eval) submodules comes back exactly as it was.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> with eval_mode(m):
        ...     _ = m(torch.randn(1, 2))  # batch of 1 is fine in eval mode
        >>> m.training
        True
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def count_flops(model: nn.Module, example_inputs: Inputs, meta: bool = True) -> int:
    """FLOPs of one eval-mode forward on ``example_inputs`` (2 x MACs, bias/BN excluded).

    With ``meta`` (the default) the forward runs on meta tensors through the captured
    graph, so the count costs no arithmetic; FlopCounterMode counts the same ops either
    way. The model is not modified: no gradients, BN running statistics untouched,
    training flags restored.

    Example:
        >>> count_flops(nn.Linear(10, 5), torch.randn(4, 10))  # 2 * 4 * 10 * 5
        400
    """
    inputs = as_inputs(example_inputs)
    if meta:
        from .capture import MetaShapeProp, trace
        with eval_mode(model):
            try:
                gm = trace(model, n_inputs=len(inputs))
            except Exception:  # noqa: BLE001 - count on the real forward instead
                gm = None
            if gm is not None:
                with FlopTotal() as counter:
                    MetaShapeProp(gm, fast=False).propagate(*inputs)
                return int(counter.get_total_flops())
    with eval_mode(model), FlopTotal() as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def count_graph_flops(gm: fx.GraphModule, example_inputs: Inputs) -> int:
    """``count_flops`` of a captured or pruned GraphModule without tracing it again.

    One eval-mode forward on the example inputs, under no_grad: for the convolutional nets
    pruned here that costs less than running the graph on meta tensors (MobileNetV2 at
    224 px, one thread: ~30 ms against ~320 ms), and the counts are the same.
    """
    with eval_mode(gm), torch.no_grad(), FlopTotal() as counter:
        gm(*as_inputs(example_inputs))
    return int(counter.get_total_flops())




def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once.

    Example:
        >>> count_params(nn.Linear(10, 5))  # 10 * 5 weights + 5 biases
        55
    """
    return sum(p.numel() for p in model.parameters())
