"""Surgery: remove dropped channels from a captured GraphModule, in place.

Every node's registry surgery rule runs once; then one generic pass slices plain
parameters used through ``get_attr`` (layer scale, functional BN statistics, biases),
site groups get an ``index_select`` before their chain, the graph is recompiled and
shape-propagated again, and every value's channel extents are checked against the plan.

Example::

    apply_surgery(gm, flow, plan, example_inputs)   # gm now computes the pruned model
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .analysis import graph_targets
from .atoms import NONE, UNKNOWN, along, carrying_axes
from .capture import MetaShapeProp
from .errors import SurgeryError
from .flow import ChannelFlow, ParamRef, Site, run_flow
from .plan import Plan
from .registry import lookup
from .ops.tensors import set_tensor, take


class SurgeryContext:
    """What a surgery rule sees: the plan's keeps for any value, and graph editing."""

    def __init__(self, gm: fx.GraphModule, flow: ChannelFlow, plan: Plan):
        self.gm, self.flow, self.plan, self.graph = gm, flow, plan, gm.graph
        self.modules = dict(gm.named_modules())
        self._sites: dict[fx.Node, Site] = {}
        for site in flow.sites:
            self._sites.setdefault(site.node, site)
        self._done: set = set()
        self._consts = 0
        self.alias: dict[fx.Node, fx.Node] = {}  # a node surgery made -> the node it stands for

    def stands_for(self, new: fx.Node, old: fx.Node) -> None:
        """Record that ``new`` (made by a rule) carries ``old``'s value: later rules read its
        unpruned shape, layout and keeps from ``old``."""
        new.meta["val"] = old.meta["val"]
        self.alias[new] = self.alias.get(old, old)

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def first_call(self, node: fx.Node, key=None) -> bool:
        key = key or node.target
        if key in self._done:
            return False
        self._done.add(key)
        return True

    def layout(self, node: fx.Node):
        return self.flow.layout_of(self.alias.get(node, node))

    def keep(self, layout: np.ndarray) -> np.ndarray:
        return self.plan.keep_layout(layout)

    def keep_along(self, node: fx.Node, axis: int) -> np.ndarray:
        """Kept positions of a node's value along ``axis`` (site-group chains included)."""
        node = self.alias.get(node, node)
        v = node.meta["val"]
        lay = self.flow.layout_of(node)
        vec = along(lay, axis, v.shape[axis])
        keep = self.plan.keep_node(node, on_full(vec, axis, lay.ndim) if vec is not None else lay)
        return keep.reshape(-1) if vec is not None else np.ones(v.shape[axis], dtype=bool)

    def kept_extents(self, node: fx.Node) -> list[int]:
        """Extent of every axis of a node's value after pruning."""
        v = node.meta["val"]
        lay = self.flow.layouts[node]
        keep = self.plan.keep_node(node, lay)
        ext = []
        for d, size in enumerate(v.shape):
            if lay.shape[d] == 1:
                ext.append(int(size))
            else:
                other = tuple(k for k in range(lay.ndim) if k != d)
                ext.append(int(keep.any(axis=other).sum()) if other else int(keep.sum()))
        return ext

    def site_of(self, node: fx.Node) -> Site | None:
        return self._sites.get(node)

    def site_keep(self, site: Site) -> np.ndarray:
        return self.plan.site_keep(site)

    def owner_of(self, target: str) -> tuple[nn.Module, str]:
        prefix, _, name = target.rpartition(".")
        return self.gm.get_submodule(prefix), name

    def const(self, values) -> fx.Node:
        """A constant long tensor stored as a buffer of the GraphModule (an ONNX initializer)."""
        name = f"_softprune_idx{self._consts}"
        self._consts += 1
        self.gm.register_buffer(name, torch.as_tensor(np.asarray(values), dtype=torch.long))
        return self.graph.get_attr(name)


def on_full(vec: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = len(vec)
    return vec.reshape(shape)


def _slice_params(sctx: SurgeryContext) -> None:
    """Plain parameters with one channel axis (owned atoms) lose their dropped entries."""
    table = sctx.flow.table
    users: dict[str, set] = {}
    for node in sctx.graph.nodes:
        if node.op == "get_attr":
            users.setdefault(node.target, set()).update(node.users)
    for node in list(sctx.graph.nodes):
        if node.op != "get_attr" or not isinstance(sctx.flow.layouts.get(node), ParamRef):
            continue
        idx = table.owner_index.get(node.target)
        if idx is None or table.owners[idx].kind != "param" or not sctx.first_call(node, key=("param", node.target)):
            continue
        axis = carrying_axes(sctx.flow.param_layouts[node.target])[0]
        keep = sctx.plan.keep_layout(table.owners[idx].atoms) & _chain_keep(sctx, users[node.target])
        if keep.all():
            continue
        owner, name = sctx.owner_of(node.target)
        set_tensor(owner, name, take(getattr(owner, name).data, axis, keep))


def _chain_keep(sctx: SurgeryContext, users: set) -> np.ndarray | bool:
    """Position keep of the site-group chain whose op reads a parameter (``users``: the nodes
    reading it; a functional BN inside a chain, as timm's BatchNormAct2d traces), or True
    when no chain reads it.

    Its entries are the chain's positions, so they drop what the site group drops as well as
    what the classes drop. A parameter read both inside a chain and elsewhere (or by two
    chains) would need two slicings; we refuse it rather than guess."""
    chains = {id(sctx.plan.chain_group.get(u)): sctx.plan.chain_group.get(u) for u in users}
    if set(chains) == {id(None)}:
        return True
    if len(chains) > 1:
        raise SurgeryError(f"a parameter read by {sorted(u.name for u in users)} is read inside a "
                           "site-group chain and elsewhere")
    return sctx.plan.position_keep(next(iter(chains.values())))


def _select_for_site_groups(sctx: SurgeryContext) -> None:
    """Before each site group's chain: keep the positions both groups keep."""
    for g in sctx.plan.groups:
        if not g.is_site_group:
            continue
        src_keep = sctx.plan.source_keep(g)
        both = src_keep & sctx.plan.position_keep(g)
        if (both == src_keep).all():
            continue
        idx = (np.cumsum(src_keep) - 1)[both]
        first = g.chain[0]
        with sctx.graph.inserting_before(first):
            sel = sctx.graph.call_function(torch.index_select, (g.source, 1, sctx.const(idx)))
        sctx.stands_for(sel, g.source)  # surgery rules read unpruned shapes, as elsewhere
        first.replace_input_with(g.source, sel)


def apply_surgery(gm: fx.GraphModule, flow: ChannelFlow, plan: Plan, example_inputs: tuple) -> fx.GraphModule:
    """Rewrite ``gm`` (the graph the flow was computed on) to drop the plan's channels."""
    sctx = SurgeryContext(gm, flow, plan)
    tensors = [n for n in gm.graph.nodes
               if isinstance(flow.layouts.get(n), np.ndarray) and isinstance(n.meta.get("val"), torch.Tensor)]
    planned = {n: sctx.kept_extents(n) for n in tensors}
    layouts = {n: planned_classes(flow, plan, n) for n in tensors}
    referenced = set(graph_targets(gm.graph))
    _select_for_site_groups(sctx)
    for node in list(gm.graph.nodes):
        entry = lookup(node, sctx.modules)
        if entry is not None and entry.surgery is not None:
            entry.surgery(sctx, node)
    _slice_params(sctx)
    if referenced - set(graph_targets(gm.graph)):  # a rule erased the last node of a module or attribute
        gm.delete_all_unused_submodules()
    gm.recompile()
    check_extents(gm, planned, example_inputs)
    check_layouts(gm, layouts, flow.allow_inexact)
    return gm


def planned_classes(flow: ChannelFlow, plan: Plan, node: fx.Node) -> np.ndarray:
    """The classes of a node's layout with the plan's dropped positions removed: what the
    pruned graph's layout must be, up to renaming its atoms."""
    lay = flow.layouts[node]
    keep = np.broadcast_to(plan.keep_node(node, lay), lay.shape)
    classes = flow.table.find(lay)
    for d in range(lay.ndim):
        if lay.shape[d] > 1:
            other = tuple(k for k in range(lay.ndim) if k != d)
            classes = classes.take(np.flatnonzero(keep.any(axis=other) if other else keep), axis=d)
    return classes


def check_layouts(gm: fx.GraphModule, planned: dict, allow_inexact: bool = False) -> None:
    """Re-run the channel flow on the pruned graph (DESIGN.md section 5): every surviving
    value's layout must have its planned, filtered shape (an axis of extent 1 broadcasts)
    and every planned channel must still carry a channel identity there.

    Classes are not compared one to one: degenerate sizes legitimately change couplings (a
    grouped conv left with one input per group reads as depthwise, a depthwise conv left
    with one channel as dense; a cat of one-channel tensors unifies them), both ways.
    Values the re-analysis cannot follow (UNKNOWN, after an inserted ``index_select``) are
    not compared."""
    flow = run_flow(gm, allow_inexact)
    alive = set(gm.graph.nodes)
    weights_only = _weights_only(gm)
    for node, old in planned.items():
        new = flow.layouts.get(node)
        if node not in alive or not isinstance(new, np.ndarray) or (new == UNKNOWN).all() or (old == UNKNOWN).all():
            continue  # (the analysis did not follow the value: it froze what the value reads, planned nothing)
        if node in weights_only and (new == NONE).all():
            continue  # a parameter's channels are adopted from the value it meets; that value is checked
        try:
            new = np.broadcast_to(new, old.shape)
        except ValueError:
            raise SurgeryError(f"node {node.name}: pruned layout {new.shape} but the plan says {old.shape}") from None
        if node in weights_only:
            continue  # a cat of parameters, some left with one entry (no identity of their own)
        if ((old >= 0) & (new == NONE)).any():
            raise SurgeryError(f"node {node.name}: planned channels have no channel identity after pruning")


def _weights_only(gm: fx.GraphModule) -> set:
    """Nodes computed from parameters and constants alone (no model input): e.g. a layer
    scale ``gamma.reshape(1, -1, 1, 1)``. Their channel identity comes from the value they
    are combined with, which the re-analysis may only see through an inserted
    ``index_select`` (UNKNOWN), so they are left to that value's check (and to the shapes)."""
    out: set = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_function", "call_method")
                                      and node.all_input_nodes and all(a in out for a in node.all_input_nodes)):
            out.add(node)
    return out


def check_extents(gm: fx.GraphModule, planned: dict, example_inputs: tuple) -> None:
    """Re-run shapes on the pruned graph; each value must have its planned extents."""
    try:
        MetaShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        raise SurgeryError(f"the pruned graph does not run: {' '.join(str(exc).split())[:300]}") from exc
    alive = set(gm.graph.nodes)
    for node, ext in planned.items():
        if node not in alive:
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and list(v.shape) != ext:
            raise SurgeryError(f"node {node.name}: pruned shape {list(v.shape)} but the plan says {ext}")
