"""Channel-flow analysis: walk the captured graph once and give every value a layout.

Each node's registry rule computes its output layout from its inputs' layouts and
records couplings (union-find over atoms), mask sites, constraints and frozen atoms.
Nodes without a rule freeze every channel they touch and produce ``UNKNOWN``.

Example::

    gm = capture(model, inputs)
    flow = run_flow(gm)
    flow.layouts[node]   # numpy layout of the node's tensor value
    flow.sites           # inputs of channel-mixing ops
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from . import ops  # noqa: F401  (fills the registry)
from .atoms import NONE, UNKNOWN, AtomTable, filled, on_axis
from .flow_types import Balance, ChannelCount, Grid, NonEmpty, ParamRef, Site  # noqa: F401 (re-exported)
from .specialise import freeze_specialised
from .registry import describe, lookup, node_arg


# Strict mode: an exception inside a channel rule is a bug, so it propagates instead of
# freezing the op's channels (which would look like caution). On in the test suite
# (SOFTPRUNE_STRICT=1, tests/conftest.py), off for users, whose models must not fail on a
# rule the project got wrong.
_STRICT = [os.environ.get("SOFTPRUNE_STRICT", "") not in ("", "0")]


def strict_mode() -> bool:
    """Whether rule exceptions re-raise (``SOFTPRUNE_STRICT=1`` or ``set_strict(True)``)."""
    return _STRICT[0]


def set_strict(flag: bool) -> bool:
    """Turn strict mode on or off; returns the previous setting."""
    old, _STRICT[0] = _STRICT[0], bool(flag)
    return old


@contextlib.contextmanager
def strict(flag: bool = True):
    """``with strict(False):`` runs a block with strict mode set to ``flag``."""
    old = set_strict(flag)
    try:
        yield
    finally:
        set_strict(old)


@dataclass
class ChannelFlow:
    gm: fx.GraphModule
    table: AtomTable
    layouts: dict[fx.Node, Any] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    constraints: list = field(default_factory=list)
    module_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    inexact: list[str] = field(default_factory=list)
    allow_inexact: bool = False
    param_layouts: dict[str, np.ndarray] = field(default_factory=dict)
    unknown_why: dict[fx.Node, str] = field(default_factory=dict)

    def layout_of(self, node: fx.Node) -> Any:
        """A node's layout, with parameters as they were materialised (or UNKNOWN)."""
        lay = self.layouts.get(node)
        if isinstance(lay, ParamRef):
            return self.param_layouts.get(lay.target, filled(UNKNOWN, lay.value.dim()))
        return lay


class FlowContext:
    """What a channel rule sees: the node, its inputs' layouts and values, and the
    recording functions."""

    def __init__(self, flow: ChannelFlow, modules: dict):
        self.flow, self.table, self.modules = flow, flow.table, modules
        self.node: fx.Node | None = None

    # ------------------------------------------------------------ reading
    @property
    def module(self):
        return self.modules[self.node.target]

    def where(self) -> str:
        return f"{describe(self.node, self.modules)} at node {self.node.name}"

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        return node_arg(self.node, index, name, default)

    def val(self, arg: Any) -> Any:
        return arg.meta.get("val") if isinstance(arg, fx.Node) else arg

    def out(self) -> Any:
        return self.node.meta.get("val")

    def layout(self, arg: Any) -> Any:
        """The layout of a tensor argument (numpy array); None for non-tensors."""
        if not isinstance(arg, fx.Node):
            return filled(NONE, 0) if isinstance(arg, (int, float, bool)) else None
        lay = self.flow.layouts.get(arg)
        if isinstance(lay, ParamRef):
            return self.param_layout(lay)
        return lay

    def param_layout(self, ref: ParamRef, channel_axes: set = frozenset()) -> np.ndarray:
        """A parameter with one channel axis owns atoms on it. One varying along several
        axes (a ViT's (1, tokens, C) position embedding) owns atoms on the one of them where
        the tensor its first reader combines it with carries channels (``channel_axes``,
        counted from the right), when there is exactly one; otherwise it is UNKNOWN."""
        if ref.target not in self.flow.param_layouts:
            self.flow.param_layouts[ref.target] = self._param_layout(ref, channel_axes)
        return self.flow.param_layouts[ref.target]

    def _param_layout(self, ref: ParamRef, channel_axes: set) -> np.ndarray:
        shape = tuple(ref.value.shape)
        varying = [d for d, s in enumerate(shape) if s > 1]
        if not varying:
            return filled(NONE, len(shape))
        if len(varying) > 1:
            varying = [d for d in varying if d - len(shape) in channel_axes]
            if len(varying) != 1:
                return filled(UNKNOWN, len(shape))
        atoms, _ = self.table.owner(ref.target, "param", shape[varying[0]])
        return on_axis(atoms, varying[0], len(shape))

    def sequence(self, arg: Any) -> list[tuple[Any, Any]]:
        """(layout, value) of each tensor in a list argument, or in a node that yields one."""
        if isinstance(arg, fx.Node):
            lays, vals = self.flow.layouts.get(arg), self.val(arg)
            if not isinstance(lays, (tuple, list)):
                return [(None, vals)]
            return list(zip(lays, vals))
        return [(self.layout(a), self.val(a)) for a in arg]

    # ------------------------------------------------------------ recording
    def unify(self, *layouts: np.ndarray) -> np.ndarray:
        layouts = [x for x in layouts if x is not None]
        why = next((self.flow.unknown_why[n] for n in self.node.all_input_nodes if n in self.flow.unknown_why),
                   "channels the analysis cannot follow")
        out = layouts[0]
        for other in layouts[1:]:
            out = self.table.unify(out, other, f"combined at node {self.node.name} with {why}")
        return out

    def unify_columns(self, layout: np.ndarray, axis: int, extent: int) -> np.ndarray:
        """The atoms along ``axis``, unified across every other axis: the rows of a (heads x
        dim) grid are pruned alike, the same positions in every head (attention's rule)."""
        rows = np.moveaxis(layout, axis, -1)
        rows = np.broadcast_to(rows.reshape(-1, rows.shape[-1]), (rows.size // rows.shape[-1], extent))
        if rows.shape[0] > 1:
            self.unify(rows.copy(), np.broadcast_to(rows[0], rows.shape).copy())
        return rows[0].copy()

    def freeze(self, layout: Any, reason: str) -> None:
        for lay in _leaves(layout):
            self.table.freeze(lay, reason)

    def owned(self, width: int, kind: str, key: str | None = None) -> np.ndarray:
        """Atoms owned by the current module (or ``key``): the same ones at every call."""
        key = key or (self.node.target if self.node.op == "call_module" else self.node.name)
        atoms, _ = self.table.owner(key, kind, width)
        return atoms

    def site(self, arg: int | str, atoms: np.ndarray, axis: int, kind: str = "conv", fill: float = 0.0) -> Site:
        s = Site(self.node, arg, np.asarray(atoms), axis, kind, fill)
        self.flow.sites.append(s)
        return s

    def constrain(self, constraint) -> None:
        self.flow.constraints.append(constraint)

    def inexact(self, layout: np.ndarray, what: str) -> None:
        """An op that mixes statistics across channels: frozen unless allow_inexact."""
        if self.flow.allow_inexact:
            self.table.tag(layout, "inexact")
            self.flow.inexact.append(f"{what} at node {self.node.name}")
        else:
            self.table.freeze(layout, f"inexact: {what} at node {self.node.name} (allow_inexact=True prunes it)")

    def unknown(self, reason: str | None = None) -> Any:
        """Freeze every channel the node reads; its value's channels are UNKNOWN."""
        reason = reason or f"no rule for {self.where()}"
        for arg in _node_args(self.node):
            self.freeze(self.layout(arg), reason)
        self.flow.unknown_why[self.node] = reason
        return unknown_like(self.out())


def _node_args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _leaves(layout: Any):
    if isinstance(layout, np.ndarray):
        yield layout
    elif isinstance(layout, ChannelCount):
        yield layout.atoms
    elif isinstance(layout, (tuple, list)):
        for x in layout:
            yield from _leaves(x)
    elif isinstance(layout, dict):
        for x in layout.values():
            yield from _leaves(x)


def unknown_like(value: Any) -> Any:
    """UNKNOWN layouts in the structure of ``value`` (None for non-tensors)."""
    return tree_map(lambda v: filled(UNKNOWN, v.dim()) if isinstance(v, torch.Tensor) else None, value)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(value))


def run_flow(gm: fx.GraphModule, allow_inexact: bool = False) -> ChannelFlow:
    """Compute the layout of every node of a captured GraphModule."""
    flow = ChannelFlow(gm, AtomTable(), allow_inexact=allow_inexact)
    ctx = FlowContext(flow, dict(gm.named_modules()))
    for node in gm.graph.nodes:
        ctx.node = node
        flow.layouts[node] = _node_layout(ctx, node)
    # channel extents that Python turned into constants while tracing (int(x.shape[1]))
    freeze_specialised(flow)
    return flow


def _node_layout(ctx: FlowContext, node: fx.Node) -> Any:
    value = node.meta.get("val")
    if node.op == "placeholder":
        return _input_layout(ctx, node, value)
    if node.op == "get_attr":
        return ParamRef(node.target, value) if isinstance(value, torch.Tensor) else None
    if node.op == "output":
        ctx.freeze([ctx.layout(a) for a in node.all_input_nodes], "reaches a model output")
        return None
    if node.op == "call_module" and node.target in ctx.flow.gm.meta.get("untraced", ()):
        return ctx.unknown(f"untraceable submodule {node.target} (treated as a leaf)")
    entry = lookup(node, ctx.modules)
    if entry is not None:
        try:
            layout = entry.rule(ctx, node)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot follow the op freezes
            if strict_mode():
                exc.add_note(f"in the channel rule of {ctx.where()} (strict mode: SOFTPRUNE_STRICT)")
                raise
            return ctx.unknown(f"{ctx.where()}: rule failed ({type(exc).__name__}: {exc})")
        if layout is None and _has_tensor(value):
            # no layout for a tensor: its readers could not see the channels it carries,
            # which would then be pruned under them (a leaf fed through nn.Identity(tuple))
            if strict_mode():
                raise AssertionError(f"the channel rule of {ctx.where()} gave no layout for a tensor output")
            return ctx.unknown(f"{ctx.where()}: the rule gave no layout for its output")
        return layout
    if not any(_has_tensor(ctx.val(a)) for a in node.all_input_nodes) and not _has_tensor(value):
        return None  # plain Python arithmetic on sizes
    return ctx.unknown()


def _input_layout(ctx: FlowContext, node: fx.Node, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() < 2:
            return filled(UNKNOWN, value.dim())
        atoms = ctx.table.new(f"input:{node.name}", value.shape[1], "input")
        ctx.table.freeze(atoms, "model input")
        return on_axis(atoms, 1, value.dim())
    return unknown_like(value)
