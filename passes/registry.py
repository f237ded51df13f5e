"""The op registry: one small entry per op, holding its channel rule and surgery rule.

A *channel rule* ``rule(ctx, node) -> layout`` reads the layouts of the node's inputs
(``ctx.layout(arg)``), records couplings (``ctx.unify``), mask sites (``ctx.site``),
constraints and frozen atoms, and returns the layout of the node's value.

A *surgery rule* ``surgery(ctx, node) -> None`` rewrites the node (or the parameters of
its module) once the dropped channels are known; ``None`` means the op needs no rewrite
(channel-wise ops, cat, permutes). An op without an entry freezes the channels it
touches, so supporting a new op means adding one entry::

    @register(torch.roll)
    def roll_rule(ctx, node):
        ...

Targets are module classes (``nn.Conv2d``), functions (``torch.cat``, ``operator.add``)
or method names (``"view"``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx
from torch import nn


@dataclass(frozen=True)
class ZeroBelow:
    """An activation that is exactly zero on ``x <= edge`` (ReLU 0, Hardswish -3)."""
    edge: float
    exact: ClassVar[bool] = True

    def threshold(self, module, node, delta: float) -> float | None:
        return self.edge


@dataclass(frozen=True)
class SmallTail:
    """A smooth activation whose left tail tends to zero (SiLU, GELU, sigmoid): its dead
    threshold is the largest ``t`` with ``|f(y)| <= delta`` for every ``y <= t``.

    ``make(*params)`` returns ``f`` on float64 tensors; ``params(module, node)`` reads the
    op's own arguments (GELU's ``approximate``, Softplus's ``beta``) as a hashable tuple.
    """
    name: str
    make: Callable[..., Callable]
    params: Callable[[Any, Any], tuple | None] = lambda module, node: ()
    exact: ClassVar[bool] = False

    def threshold(self, module, node, delta: float) -> float | None:
        params = self.params(module, node)  # None: an argument is only known at run time
        return None if params is None else solve_tail(self.name, self.make, params, delta)


_TAILS: dict[tuple, float | None] = {}


def solve_tail(name: str, make: Callable, params: tuple, delta: float) -> float | None:
    """``max t`` with ``|f(y)| <= delta`` for all ``y <= t``, by a 0.01 grid on [-60, 60]
    then bisection to float64 precision; None when the tail does not vanish or ``|f|``
    never exceeds ``delta``. Cached per (function, params, delta)."""
    key = (name, params, float(delta))
    if key not in _TAILS:
        f = make(*params)
        y = torch.arange(-60.0, 60.0, 0.01, dtype=torch.float64)
        over = (f(y).abs() > delta).nonzero()
        if not len(over) or int(over[0]) == 0:
            _TAILS[key] = None
        else:
            lo, hi = float(y[int(over[0]) - 1]), float(y[int(over[0])])
            for _ in range(80):  # invariant: |f(lo)| <= delta < |f(hi)|
                mid = 0.5 * (lo + hi)
                if abs(float(f(torch.tensor(mid, dtype=torch.float64)))) <= delta:
                    lo = mid
                else:
                    hi = mid
            _TAILS[key] = lo
    return _TAILS[key]


@dataclass(frozen=True)
class FlopsTerm:
    """An op's share of the FLOPs cost model: ``coef * I * O`` where I (``per_input``: the
    kept channels at its mask site, else 1) and O (kept channels of its output along
    ``out_axis``, None: 1) are what pruning changes."""
    coef: float
    per_input: bool
    out_axis: int | None


@dataclass(frozen=True)
class OpEntry:
    """Everything the project knows about one op.

    - ``rule(ctx, node)``: channel rule; ``surgery(sctx, node)``: rewrite once channels go;
    - ``shape(callee, args, kwargs)``: fast analytic output shape (a meta tensor) or None;
    - ``flops(node, modules, site, layout) -> FlopsTerm | tuple | None``: its FLOPs term(s) (mixing
      ops), given its first mask site (or None) and its output layout;
    - ``dead``: where an activation's output is (nearly) zero (``ZeroBelow``/``SmallTail``);
    - ``chain``: role in a site group's chain: "norm" (per-channel parameters) or "pass"
      (channel-wise, no parameters of its own), or ``chain(module, node) -> role | None``
      where the instance decides (GroupNorm only with one channel per group: statistics
      over several would change when channels are selected before it);
    - ``bn``: "site" for BatchNorm (an SCP BN site), "through" for a residual add an
      activation may sit behind;
    - ``importance(node, modules)``: L1 of the weight columns reading each input channel.
    """
    name: str
    rule: Callable
    surgery: Callable | None = None
    dead: ZeroBelow | SmallTail | None = None
    shape: Callable | None = None
    flops: Callable | None = None
    chain: str | Callable | None = None
    bn: str | None = None
    importance: Callable | None = None


_REGISTRY: dict[Any, OpEntry] = {}
# functions of libraries that may not be installed, keyed by "module.name"
_BY_NAME: dict[str, OpEntry] = {}


def op_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or getattr(target, "__qualname__", None) or repr(target)
    if not mod and getattr(torch, name, None) is target:
        mod = "torch"  # builtins such as torch.roll have no __module__
    mod = {"torch.nn.functional": "F", "_operator": "operator", "torch._C._nn": "F"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def register(*targets: Any, surgery: Callable | None = None, **fields):
    """Decorator: register a channel rule (and optional surgery rule and other ``OpEntry``
    fields) for ``targets``."""
    def deco(rule: Callable) -> Callable:
        for target in targets:
            _REGISTRY[target] = OpEntry(op_name(target), rule, surgery, **fields)
        return rule
    return deco


def annotate(*targets: Any, **fields) -> None:
    """Set more ``OpEntry`` fields (``shape``, ``dead``, ``chain``...) of registered targets."""
    for target in targets:
        _REGISTRY[target] = replace(_REGISTRY[target], **fields)


def register_name(qualified: str, rule: Callable, surgery: Callable | None = None, **fields) -> None:
    """A rule for a function known only by its qualified name (e.g. torchvision's
    ``torchvision.ops.stochastic_depth.stochastic_depth``, wrapped as a leaf by fx)."""
    _BY_NAME[qualified] = OpEntry(qualified, rule, surgery, **fields)


def register_op(target: Any, rule: Callable, surgery: Callable | None = None, **fields) -> None:
    """Public entry point: add (or replace) the rule for a custom op or module class."""
    _REGISTRY[target] = OpEntry(op_name(target), rule, surgery, **fields)


def exact_entry(target: Any) -> OpEntry | None:
    """The entry registered for exactly this class or function (no subclass search): the
    fast shape rules use it, where a subclass may compute something else."""
    try:
        return _REGISTRY.get(target)
    except TypeError:  # unhashable
        return None


def registered_keys() -> list:
    """Every registered target and qualified name (the coverage test walks them)."""
    return list(_REGISTRY) + list(_BY_NAME)


def node_arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    """A call's argument by position, else by keyword ``name`` (``F.linear(x, weight=w)``)."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default) if name else default


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> OpEntry | None:
    """The entry for a node: by module class (a subclass only if it keeps the registered
    class's forward), by function, or by method name."""
    if node.op == "call_module":
        cls = type(modules[node.target])
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        for base in cls.__mro__[1:]:
            if base in _REGISTRY and getattr(cls, "forward", None) is getattr(base, "forward", None):
                return _REGISTRY[base]
        return None
    if node.op == "call_function":
        try:
            entry = _REGISTRY.get(node.target)
        except TypeError:  # unhashable target
            return None
        if entry is None and _BY_NAME:
            entry = _BY_NAME.get(_qualified_name(node.target))
        return entry
    if node.op == "call_method":
        return _REGISTRY.get(node.target)
    return None


def entry_of(obj: Any) -> OpEntry | None:
    """The entry for a module (instance or class), a function or a method name, as
    ``lookup`` would find it for a node calling it."""
    if isinstance(obj, str):
        return _REGISTRY.get(obj)
    cls = obj if isinstance(obj, type) else type(obj) if isinstance(obj, nn.Module) else None
    if cls is not None:
        for base in cls.__mro__:
            if base in _REGISTRY and (base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None)):
                return _REGISTRY[base]
        return None
    try:
        return _REGISTRY.get(obj)
    except TypeError:  # unhashable
        return None


def has_rule(fn: Any) -> bool:
    """Whether a function has an entry (by object or by qualified name)."""
    return entry_of(fn) is not None or _qualified_name(fn) in _BY_NAME


def _qualified_name(fn: Any) -> str:
    """``module.name``, the key of ``register_name`` entries."""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"


def dead_threshold(node: fx.Node, modules: dict[str, nn.Module], delta: float = 0.05) -> float | None:
    """Dead threshold ``t`` of the activation a node calls: ReLU/ReLU6 0, Hardswish and
    Hardsigmoid -3, SiLU and Mish about -4.49, GELU about -1.95, sigmoid -2.94, softplus
    -2.97 (``delta = 0.05``); None for ops with no dead region (LeakyReLU, ELU, Tanh, ...)."""
    entry = lookup(node, modules) if node.op in ("call_module", "call_function", "call_method") else None
    if entry is None or entry.dead is None:
        return None
    module = modules[node.target] if node.op == "call_module" else None
    return entry.dead.threshold(module, node, delta)


def exact_zero_threshold(obj: Any) -> float | None:
    """Edge of an exact zero region for a module, class, function or method name (None for
    smooth or no dead region): what ``scp.rectifier_threshold`` reports."""
    entry = entry_of(obj)
    if entry is None or entry.dead is None or not entry.dead.exact:
        return None
    return entry.dead.threshold(obj if isinstance(obj, nn.Module) else None, None, 0.05)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Human name of what a node calls, for frozen reasons ("no rule for torch.roll")."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    return op_name(node.target)
