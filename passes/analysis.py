"""Fork an analysis: a private copy of a captured graph with its flow and groups.

One trace and one flow serve a whole pipeline run. The passes that rewrite a graph
(mask insertion, surgery) work on a fork, so the analysis itself stays untouched and
the next pass can fork it again. A fork maps every ``fx.Node`` the flow and the groups
refer to onto the copied graph's node of the same position, so results keyed by nodes
(layouts, sites, chains) stay valid without re-tracing or re-running any rule.

Example::

    gm2, flow2, groups2 = fork(cg.gm, cg.flow, cg.groups)          # modules copied too
    insert_hard_masks(gm2, flow2, Plan.from_drop(flow2, groups2, drop))
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .outputs import copy_output_type


def fork(gm: fx.GraphModule, flow, groups: list, *, copy_modules: bool = True, share_tensors: bool = False,
         compile: bool = True):
    """``(gm, flow, groups)`` copied so that editing the copy never touches the original.

    With ``copy_modules`` the parameters and buffers are copied too (surgery slices them);
    without, the fork's graph calls the original modules (mask insertion only adds nodes
    and buffers of its own, so sharing the weights is safe and costs nothing).
    ``share_tensors`` copies the modules but not their tensors (surgery replaces the ones
    it slices); the caller must then call ``own_tensors`` on the result. Without
    ``compile`` the copy's code is not generated: the caller edits the graph and then
    calls ``recompile()`` (surgery does), which saves one code generation per prune.
    """
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    node_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, node_map)
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    node_map[old_out] = graph.output(out, old_out.type)
    copy_output_type(graph, gm.graph)
    for node in graph.nodes:  # annotations only: dropped before the one compile, not after
        node.type = None
    root = _copy_modules(gm, share_tensors) if copy_modules else gm
    new = fx.GraphModule(root, graph, gm.__class__.__name__) if compile else _uncompiled(root, graph, gm)
    new.meta.update(copy.copy(gm.meta))
    # deepcopy with a memo that already maps each node (and the graph module, and every
    # tensor the flow points at) to its counterpart: everything else in the flow and the
    # groups (numpy layouts, records) is copied once, and the atom table is shared (frozen
    # after the analysis).
    memo: dict[int, object] = {id(old): nu for old, nu in node_map.items()}
    memo[id(gm)] = new
    memo[id(flow.table)] = flow.table
    new_tensors = dict(new.named_parameters(remove_duplicate=False)) | dict(new.named_buffers(remove_duplicate=False))
    old_tensors = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    for name, t in old_tensors.items():
        if name in new_tensors:
            memo[id(t)] = new_tensors[name]
    for name, t in gm.__dict__.items():  # tensor constants the tracer attached
        if hasattr(t, "dim") and name in new.__dict__:
            memo[id(t)] = new.__dict__[name]
    # layouts are numpy arrays no pass writes to: shared, not copied (most of the copying time)
    for table in (flow.layouts, flow.param_layouts, flow.module_inputs):
        for value in table.values():
            if isinstance(value, np.ndarray):
                memo[id(value)] = value
    for site in flow.sites:
        memo[id(site.atoms)] = site.atoms
    for g in groups:
        for name in g.SHARED:
            value = getattr(g, name)
            memo[id(value)] = value
    flow2, groups2 = copy.deepcopy((flow, groups), memo)
    return new, flow2, groups2


def _uncompiled(root: nn.Module, graph: fx.Graph, gm: fx.GraphModule) -> fx.GraphModule:
    """``fx.GraphModule(root, graph)`` without its code generation (``recompile`` is left to
    the caller): built on an empty graph, then given ``root``'s modules, tensors and
    ``graph`` as the graph setter would, minus the compile."""
    new = fx.GraphModule(root, fx.Graph(), gm.__class__.__name__)
    new.training = gm.training
    for name in graph_targets(graph):
        fx.graph_module._copy_attr(root, new, name)
    new._graph = graph
    graph.owning_module = new
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:  # as __init__ does
        new._tracer_cls = graph._tracer_cls
    new._tracer_extras = graph._tracer_extras or {}
    return new


def graph_targets(graph: fx.Graph) -> list[str]:
    """The module and attribute targets ``graph`` reads, first use first."""
    return list(dict.fromkeys(n.target for n in graph.nodes if n.op in ("call_module", "get_attr")))


def _copy_modules(gm: fx.GraphModule, share_tensors: bool = False) -> nn.Module:
    """The submodules, parameters, buffers and tensor constants of ``gm`` deep-copied
    (one memo: tied weights stay tied), without copying and recompiling its graph as
    ``copy.deepcopy(gm)`` would. With ``share_tensors`` each module is copied with its own
    parameter, buffer and child dicts, but the tensors themselves are the originals."""
    if share_tensors:
        return _copy_structure(gm, {})
    memo: dict[int, object] = {}
    root = nn.Module()
    root._modules = copy.deepcopy(gm._modules, memo)
    root._parameters = copy.deepcopy(gm._parameters, memo)
    root._buffers = copy.deepcopy(gm._buffers, memo)
    for name, value in gm.__dict__.items():
        if isinstance(value, torch.Tensor):
            root.__dict__[name] = copy.deepcopy(value, memo)
    return root


def _copy_structure(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:  # a module reached twice stays one module
        return memo[id(module)]
    new = nn.Module() if isinstance(module, fx.GraphModule) else copy.copy(module)
    memo[id(module)] = new
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else _copy_structure(m, memo) for k, m in module._modules.items()}
    if isinstance(module, fx.GraphModule):
        new.__dict__.update({k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)})
    return new


def own_tensors(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` its own copy of every parameter, buffer and tensor constant whose
    storage it still shares with ``old`` (after a ``share_tensors`` fork and surgery), so
    training or editing the result never writes into the analysed model."""
    def storages(m):
        return {t.untyped_storage().data_ptr() for t in _tensors(m).values() if t.numel()}
    shared = storages(old)
    for mod in new.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None and t.numel() and t.untyped_storage().data_ptr() in shared:
                    c = t.detach().clone()
                    table[name] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
        for name, t in list(mod.__dict__.items()):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() in shared:
                mod.__dict__[name] = t.detach().clone()


def _tensors(m: nn.Module) -> dict:
    out = dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
    for name, mod in m.named_modules():
        out.update({f"{name}.{k}": v for k, v in mod.__dict__.items() if isinstance(v, torch.Tensor)})
    return out
