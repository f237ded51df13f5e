"""Meta values, size provenance and specialisation records for the specialising tracer.

Every node the tracer records gets a meta value (``node.meta["val"]``) computed from its
arguments' meta values: meta tensors for tensors (no data, no arithmetic), plain Python
values for sizes. Python that consumes a traced value is answered from it and recorded
as a :class:`Specialisation` with the user's source line.

Example::

    s = Specialisation("bool", "getattr_1 != None", True, "head.py:42", "if self.shape != shape:", [], True)
    str(s)  # 'specialised at head.py:42: `if self.shape != shape:` (bool: True)'
"""
from __future__ import annotations

import copy
import linecache
import operator
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .shapes import fast_function_shape, fast_module_shape

# with a trailing separator: torchvision's files are not torch's
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PASSES_DIR = os.path.dirname(__file__) + os.sep
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep
_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # installed: softprune_fx/; source: the repo
_PKG_DIR = (_PARENT if os.path.basename(_PARENT) == "softprune_fx" else os.path.join(_PARENT, "softprune_fx")) + os.sep
META = torch.device("meta")
_FULL = torch.full  # the original: the tracer patches torch's factories while it runs


class DataDependentError(fx.proxy.TraceError):
    """Python consumed a value that depends on tensor contents: never specialised."""


@dataclass
class Specialisation:
    kind: str          # bool, int, index, float, math, len, iter
    expr: str          # the traced expression, in graph terms
    value: Any         # what Python got
    where: str         # file:line of the user code that consumed it
    code: str          # that source line
    reads: list = field(default_factory=list)   # [(node name, dim)] of the extents it read
    batch: bool = False                           # it read the batch dimension

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = self.value if isinstance(self.value, (bool, int, float, str)) else repr(self.value)
        d["reads"] = [list(r) for r in self.reads]
        return d

    def __str__(self) -> str:
        return f"specialised at {self.where}: `{self.code}` ({self.kind}: {self.value!r})"


def is_internal(filename: str) -> bool:
    """Frames of torch, softprune-fx, generated code and the standard library (not site-packages)."""
    if filename.startswith(("<", TORCH_DIR, _PASSES_DIR, _PKG_DIR)):
        return True
    return filename.startswith(_STDLIB_DIR) and "site-packages" not in filename


_USER_FILES: dict[str, bool] = {}


def user_code(frame) -> bool:
    """Whether ``frame`` runs the user's code (what the model would run for real), not torch,
    fx, softprune-fx or the standard library. Code given as a string (``python -c``, exec) is
    the user's; fx's generated code is not."""
    name = frame.f_code.co_filename
    known = _USER_FILES.get(name)
    if known is None:
        known = _USER_FILES[name] = not is_internal(name) or (
            name.startswith("<") and not name.startswith(("<eval_with_key", "<frozen")))
    return known


def traced_value(proxy, missing=None):
    """The recorded meta value a Proxy stands for (``missing`` when it has none); an
    attribute proxy (``x.shape``) is recorded first."""
    return proxy.node.meta.get("val", missing)


def traced_tensor(proxy) -> bool:
    """Whether a Proxy stands for a tensor (its recorded meta value is one)."""
    return isinstance(traced_value(proxy), torch.Tensor)


def user_frame(frame=None) -> tuple[str, str]:
    """``("file:line", source text)`` of the innermost frame outside torch, softprune-fx
    and the standard library, from the current stack (or from ``frame`` outwards)."""
    f = frame or sys._getframe(1)
    while f is not None and is_internal(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return "?", ""
    return _place(f.f_code.co_filename, f.f_lineno)


def traceback_line(exc: BaseException) -> str:
    """``file:line`` of the innermost user frame of an exception's traceback ('' if none)."""
    tb, found = exc.__traceback__, ""
    while tb is not None:
        if not is_internal(tb.tb_frame.f_code.co_filename):
            found = _place(tb.tb_frame.f_code.co_filename, tb.tb_lineno)[0]
        tb = tb.tb_next
    return found


def _place(filename: str, line: int) -> tuple[str, str]:
    return f"{_short_path(filename)}:{line}", linecache.getline(filename, line).strip()


def _short_path(filename: str) -> str:
    """The path from ``site-packages`` on, or relative to the working directory."""
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


# ----------------------------------------------------------------------------- meta values
def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape, strides and dtype (no op runs on ``t``)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=META)


def meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (no data copied);
    whatever its forward writes lands in the copy."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(meta_like(p), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = meta_like(b)
    return copy.deepcopy(module, memo)


def _device_free(value: Any) -> Any:
    """Devices in an op's arguments become meta, so the meta value stays on meta."""
    if isinstance(value, torch.device):
        return META
    if isinstance(value, (tuple, list)):
        return type(value)(_device_free(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def _scalar_fill(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``torch.full(size, t)`` with a 0-d tensor ``t`` reads its value (``.item()``); on meta
    only the dtype matters (ultralytics' ``make_anchors`` fills with a stride buffer element)."""
    fill = args[1]
    dtype = fill.dtype if not fill.is_floating_point() else torch.get_default_dtype()
    return (args[0], False if dtype == torch.bool else 0, *args[2:]), {"dtype": dtype, **kwargs}


_DEVICE_METHODS = {"cpu", "cuda", "pin_memory"}


def meta_call(kind: str, target: Any, args: tuple, kwargs: dict, module: nn.Module | None, twins: dict):
    """The meta value of one recorded call, from its arguments' meta values."""
    if "device" in kwargs:
        kwargs = {**kwargs, "device": META}
    if kind == "call_function":
        if target is getattr and len(args) == 2 and args[1] == "device" and isinstance(args[0], torch.Tensor):
            return META  # replaced by the example's device when Python reads it
        if target is _FULL and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            args, kwargs = _scalar_fill(args, kwargs)
        fast = fast_function_shape(target, args, kwargs)
        return fast if fast is not None else target(*args, **kwargs)
    if kind == "call_method":
        self, rest = args[0], args[1:]
        if isinstance(self, torch.Tensor):
            if target in _DEVICE_METHODS:
                return self
            if target == "new_full" and len(rest) >= 2 and isinstance(rest[1], torch.Tensor):
                rest = (rest[0], 0, *rest[2:])  # the fill's value is data; only the shape and dtype matter
            if target == "to":
                rest = tuple(a for a in rest if not isinstance(a, (torch.device, str)))
                if not rest and set(kwargs) <= {"device", "non_blocking", "copy"}:
                    return self
        return getattr(self, target)(*rest, **_device_free(kwargs))
    if kind == "call_module":
        fast = fast_module_shape(module, args, kwargs)
        if fast is not None:
            return fast
        twin = twins.get(id(module))
        if twin is None:
            twin = twins[id(module)] = meta_twin(module)
        return twin(*args, **kwargs)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- provenance
#: a node's *reads*: for a size value, a tuple (one frozenset of (node, dim) per element);
#: for any other Python value, one frozenset of the extents it was computed from.
EMPTY = frozenset()


def flat_reads(reads: Any) -> frozenset:
    if isinstance(reads, tuple):
        return frozenset().union(*reads) if reads else EMPTY
    return reads or EMPTY


def node_reads(kind: str, target: Any, args: tuple, value: Any, arg_reads: dict) -> Any:
    """Which tensor extents a Python (non-tensor) value was computed from."""
    first = args[0] if args else None
    src = first.node if isinstance(first, fx.Proxy) else None
    tensor_arg = src is not None and isinstance(first.node.meta.get("val"), torch.Tensor)
    if tensor_arg and ((kind == "call_function" and target is getattr and args[1] == "shape")
                       or (kind == "call_method" and target == "size" and len(args) == 1)):
        return tuple(frozenset({(src, d)}) for d in range(len(value)))
    if tensor_arg and kind == "call_method" and target == "size":
        dim = args[1] if isinstance(args[1], int) else 0
        return frozenset({(src, dim % max(first.node.meta["val"].dim(), 1))})
    if tensor_arg and ((kind == "call_method" and target in ("dim", "ndimension"))
                       or (target is getattr and args[1] in ("ndim", "dtype", "device", "is_cuda"))):
        return EMPTY
    if tensor_arg and kind == "call_method" and target in ("numel", "nelement"):
        return frozenset((src, d) for d in range(first.node.meta["val"].dim()))
    if target is operator.getitem and isinstance(first, fx.Proxy):
        base = arg_reads.get(first.node)
        if isinstance(base, tuple) and isinstance(args[1], (int, slice)):
            return base[args[1]]
    return frozenset().union(*(flat_reads(arg_reads.get(a.node)) for a in args if isinstance(a, fx.Proxy)))


def batch_bound(node: fx.Node, value: Any, convert, is_batch) -> bool:
    """Whether Python's answer ``value`` for ``node`` changes at another batch size: the
    Python-valued expression is evaluated again with every batch extent one larger."""
    memo: dict[fx.Node, Any] = {}

    def again(n: fx.Node) -> Any:
        if n in memo:
            return memo[n]
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            out = torch.empty((v.shape[0] + 1, *v.shape[1:]), dtype=v.dtype, device=META) if is_batch(n, 0) else v
        elif n.op not in ("call_function", "call_method") or not isinstance(v, (int, float, bool, tuple, list)):
            out = v
        else:
            args = fx.node.map_arg(n.args, again)
            kwargs = fx.node.map_arg(n.kwargs, again)
            out = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
        memo[n] = out
        return out
    try:
        return convert(again(node)) != value
    except Exception:  # noqa: BLE001 - cannot tell: assume it is
        return True


def render(node: fx.Node, depth: int = 5) -> str:
    """A short text of the expression that computed ``node``."""
    if depth == 0 or node.op in ("placeholder", "get_attr") or isinstance(node.meta.get("val"), torch.Tensor):
        return node.name
    r = lambda a: render(a, depth - 1) if isinstance(a, fx.Node) else repr(a)  # noqa: E731
    if node.op == "call_function" and node.target is getattr:
        return f"{r(node.args[0])}.{node.args[1]}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{r(node.args[0])}[{r(node.args[1])}]"
    name = getattr(node.target, "__name__", str(node.target))
    fmt = fx.graph.magic_methods.get(name) or fx.graph.reflectable_magic_methods.get(name)
    if node.op == "call_function" and fmt and len(node.args) == fmt.count("{}"):
        return fmt.format(*(r(a) for a in node.args))
    if node.op == "call_method":
        return f"{r(node.args[0])}.{name}({', '.join(r(a) for a in node.args[1:])})"
    return f"{name}({', '.join(r(a) for a in node.args)})"


def freeze_specialised(flow) -> None:
    """Freeze the channels of every extent Python consumed into a constant.

    ``gm.meta["frozen_extents"]`` lists ``{"node", "dim", "reason"}`` from the tracer (an
    ``int()``/``range()``/``len()`` of a size). Where the node's layout carries channel
    atoms along that dim, pruning would change a number the traced graph has baked in, so
    those atoms are frozen with the source line. Call once, after the flow walk.
    """
    import numpy as np
    records = flow.gm.meta.get("frozen_extents", ())
    if not records:
        return
    by_name = {n.name: n for n in flow.gm.graph.nodes}
    for rec in records:
        node = by_name.get(rec["node"])
        lay = flow.layout_of(node) if node is not None else None
        if isinstance(lay, np.ndarray) and lay.ndim > rec["dim"] and lay.shape[rec["dim"]] > 1:
            flow.table.freeze(lay, rec["reason"])
