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

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn


@dataclass(frozen=True)
class OpEntry:
    name: str
    rule: Callable
    surgery: Callable | None = None


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


def register(*targets: Any, surgery: Callable | None = None):
    """Decorator: register a channel rule (and optional surgery rule) for ``targets``."""
    def deco(rule: Callable) -> Callable:
        for target in targets:
            _REGISTRY[target] = OpEntry(op_name(target), rule, surgery)
        return rule
    return deco


def register_name(qualified: str, rule: Callable, surgery: Callable | None = None) -> None:
    """A rule for a function known only by its qualified name (e.g. torchvision's
    ``torchvision.ops.stochastic_depth.stochastic_depth``, wrapped as a leaf by fx)."""
    _BY_NAME[qualified] = OpEntry(qualified, rule, surgery)


def register_op(target: Any, rule: Callable, surgery: Callable | None = None) -> None:
    """Public entry point: add (or replace) the rule for a custom op or module class."""
    _REGISTRY[target] = OpEntry(op_name(target), rule, surgery)


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
            name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
            entry = _BY_NAME.get(name)
        return entry
    if node.op == "call_method":
        return _REGISTRY.get(node.target)
    return None


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Human name of what a node calls, for frozen reasons ("no rule for torch.roll")."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    return op_name(node.target)
