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
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry, shape_wrapper

from .inputs import Inputs, as_inputs  # noqa: F401 (re-exported)


class _DispatchFlops(TorchDispatchMode):
    """FlopCounterMode's total, from torch's own formulas (``flop_registry``), without its
    per-module breakdown; ``FlopTotal`` sends every call it has no shortcut for here.
    Why not FlopCounterMode itself: it tracks the module hierarchy with global module
    hooks, which costs as much as the forward of a small pruned net (MobileNetV2 at 224 px,
    one thread: 58 ms counted against 27 ms plain)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def get_total_flops(self) -> int:
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket) or _MORE_WRAPPED.get(func._overloadpacket)
        if formula is not None:
            self.total += int(_apply(formula, args, kwargs, out))
        return out


class FlopTotal(TorchFunctionMode):
    """FlopCounterMode's total (``flop_registry``'s formulas, at the aten level), counted
    at the torch-function level where that is cheaper: a call known to run no counted op
    (``ZERO_FLOPS``: element-wise, normalisation, pooling, shape ops) runs as it is, a
    conv or linear is counted from its shapes by the formula its aten op has
    (``_DIRECT``), and any other call runs under the aten-level counter. Why: a Python
    dispatch mode costs ~20 us on every aten op of the forward, a function mode ~5 us on
    every torch call, and most calls of a CNN are the first kind (MobileNetV2 pruned, one
    thread: +6.5 ms over a 19 ms forward at the aten level). ``tests/test_cost.py`` checks
    it equals FlopCounterMode on every zoo model, random architectures and attention.

    Example:
        >>> with FlopTotal() as counter:
        ...     _ = nn.Linear(10, 5)(torch.randn(4, 10))
        >>> counter.total
        400
    """

    def __init__(self):
        super().__init__()
        self._direct = 0                # the shortcuts' count
        self._exact = _DispatchFlops()  # the count of the calls run at the aten level

    @property
    def total(self) -> int:
        return self._direct + self._exact.total

    def get_total_flops(self) -> int:  # FlopCounterMode's name, so either can be used
        return self.total

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            zero, direct = func in ZERO_FLOPS, _DIRECT.get(func)
        except TypeError:  # an unhashable callable: no shortcut
            zero, direct = False, None
        if zero or getattr(func, "__name__", None) == "__get__":  # (a property: x.shape, x.T)
            return func(*args, **kwargs)
        count = direct(args, kwargs) if direct is not None else None
        if count is None:
            with self._exact:
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self._direct += count(out)
        return out


# Modules that pick a fused fast path only when no torch-function mode is active
# (``has_torch_function`` of their arguments): under FlopTotal they would run, and be
# counted, as their slow path, where FlopCounterMode sees the fused kernel (and counts 0).
_FAST_PATH_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def flop_counter(model) -> TorchDispatchMode | TorchFunctionMode:
    """The counter for one forward of ``model``: ``FlopTotal``, or the aten-level counter
    when a module of ``model`` would take another path under a torch-function mode.

    Example:
        >>> with flop_counter(nn.Linear(10, 5)) as counter:
        ...     _ = nn.Linear(10, 5)(torch.randn(4, 10))
        >>> counter.total
        400
    """
    modules = model.modules() if isinstance(model, nn.Module) else ()
    if any(isinstance(m, _FAST_PATH_MODULES) for m in modules):
        return _DispatchFlops()
    return FlopTotal()


def _conv(args, kwargs):
    """torch.convNd: aten.convolution's formula on the shapes, for a batched input."""
    x, w = _input_weight(args, kwargs)
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() != w.dim():
        return None  # unbatched: aten sees the unsqueezed input, so the aten-level counter counts it
    return lambda out: int(conv_flop_count(x.shape, w.shape, out.shape, transposed=False))


def _linear(args, kwargs):
    """F.linear on an input of 2 or more dims: aten runs addmm, mm or a bmm of the same
    size, 2 x rows x in x out (a 1-d input runs mv, which the registry does not count)."""
    x, w = _input_weight(args, kwargs)
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() < 2 or w.dim() != 2:
        return None
    return lambda out: 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


def _input_weight(args, kwargs):
    return (args[0] if args else kwargs.get("input")), (args[1] if len(args) > 1 else kwargs.get("weight"))


_DIRECT = {torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv, F.linear: _linear}

# Calls that run no op the flop registry counts, whatever their arguments: element-wise,
# normalisation, pooling, shape and indexing ops. A call missing here is only slower.
ZERO_FLOPS = frozenset(
    [getattr(torch.Tensor, n) for n in (
        "__getitem__", "__setitem__", "__eq__", "__ne__", "__lt__", "__gt__", "__neg__", "add", "add_", "sub", "sub_",
        "mul", "mul_", "div", "div_", "neg", "abs", "exp", "sigmoid", "sigmoid_", "tanh", "relu", "relu_", "clamp",
        "clamp_", "softmax", "log_softmax", "mean", "sum", "amax", "max", "min", "eq", "ne", "masked_fill",
        "masked_fill_", "where", "chunk", "split", "unbind", "contiguous", "dim", "size", "numel", "expand",
        "expand_as", "flatten", "permute", "reshape", "view", "transpose", "unsqueeze", "squeeze", "new_zeros",
        "new_ones", "new_empty", "to", "float", "type_as", "clone", "detach", "roll", "repeat", "narrow",
        "index_select", "gather", "flip", "__len__", "__iter__", "__contains__")]
    + [getattr(torch, n) for n in (
        "add", "mul", "sub", "div", "cat", "concat", "stack", "flatten", "permute", "transpose", "reshape", "roll",
        "sigmoid", "tanh", "relu", "relu_", "exp", "mean", "sum", "split", "chunk", "unbind", "where", "zeros",
        "ones", "zeros_like", "ones_like", "arange", "full", "empty", "index_select", "gather", "flip", "clamp",
        "softmax", "_assert", "squeeze", "unsqueeze", "narrow", "channel_shuffle", "pixel_shuffle")]
    + [getattr(F, n) for n in (
        "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "gelu", "elu", "leaky_relu", "hardswish",
        "hardsigmoid", "mish", "sigmoid", "tanh", "softmax", "log_softmax", "batch_norm", "layer_norm", "group_norm",
        "instance_norm", "local_response_norm", "dropout", "dropout2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_avg_pool3d", "adaptive_max_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
        "max_pool2d", "max_pool3d", "pad", "interpolate", "embedding", "normalize", "pixel_shuffle",
        "channel_shuffle")])

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
                with flop_counter(gm) as counter:
                    MetaShapeProp(gm, fast=False).propagate(*inputs)
                return int(counter.get_total_flops())
    with eval_mode(model), flop_counter(model) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def count_graph_flops(gm: fx.GraphModule, example_inputs: Inputs) -> int:
    """``count_flops`` of a captured or pruned GraphModule without tracing it again.

    One eval-mode forward on the example inputs, under no_grad: for the convolutional nets
    pruned here that costs less than running the graph on meta tensors (MobileNetV2 at
    224 px, one thread: ~30 ms against ~320 ms), and the counts are the same.
    """
    with eval_mode(gm), torch.no_grad(), flop_counter(gm) as counter:
        gm(*as_inputs(example_inputs))
    return int(counter.get_total_flops())




def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once.

    Example:
        >>> count_params(nn.Linear(10, 5))  # 10 * 5 weights + 5 biases
        55
    """
    return sum(p.numel() for p in model.parameters())
