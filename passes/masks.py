"""Mask insertion: put a mask in front of every mask site.

Hard masks select with ``torch.where`` (a multiply would turn ``0 * inf`` into NaN) and
write the site's fill value (0, or -inf/+inf in front of a max/min over channels) at
dropped positions; a site whose positions are all kept gets no node, so masking with an
empty drop leaves the graph as it was.

Example::

    insert_hard_masks(gm, flow, plan)   # gm zeroes the dropped channels at every site
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from .capture import plain_containers
from .flow import ChannelFlow, Site
from .plan import Plan


def site_input(site: Site) -> fx.Node:
    node = site.node
    return node.args[site.arg] if isinstance(site.arg, int) else node.kwargs[site.arg]


def set_site_input(site: Site, value: fx.Node) -> None:
    node = site.node
    if isinstance(site.arg, int):
        args = list(node.args)
        args[site.arg] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, site.arg: value}


def mask_shape(site: Site, width: int) -> list[int]:
    ndim = site_input(site).meta["val"].dim()
    shape = [1] * ndim
    shape[site.axis % ndim] = width
    return shape


def insert_hard_masks(gm: fx.GraphModule, flow: ChannelFlow, plan: Plan) -> fx.GraphModule:
    """Zero (or fill) the dropped positions at every mask site of ``gm``, in place."""
    count = 0
    for site in flow.sites:
        keep = plan.site_keep(site)
        if keep.all():
            continue
        name = f"_softprune_keep{count}"
        count += 1
        gm.register_buffer(name, torch.as_tensor(keep).reshape(mask_shape(site, len(keep))))
        x = site_input(site)
        with gm.graph.inserting_before(site.node):
            masked = gm.graph.call_function(torch.where, (gm.graph.get_attr(name), x, site.fill))
        set_site_input(site, masked)
    gm.recompile()
    return gm


class HardMaskedRun(fx.Interpreter):
    """Runs ``gm`` as ``insert_hard_masks`` would make it compute, without copying or
    editing the graph: each mask site's input is selected by ``torch.where`` as it is
    read. The exactness check of a pipeline run uses it (no fork, no recompile).

    Example::

        ref = HardMaskedRun(cg.gm, cg.flow, plan).run(x)   # == masked(model, x, drop)(x)
    """

    def __init__(self, gm: fx.GraphModule, flow: ChannelFlow, plan: Plan):
        super().__init__(gm)
        self.masks: dict[fx.Node, list] = {}
        for site in flow.sites:
            keep = plan.site_keep(site)
            if not keep.all():
                mask = torch.as_tensor(keep).reshape(mask_shape(site, len(keep)))
                self.masks.setdefault(site.node, []).append((site.arg, mask, site.fill))

    def run(self, *args):
        """``fx.Interpreter.run`` without its per-node progress bar, context manager and
        checks (one forward of the check: interpreting cost a sixth of it), masking each
        site's input as it is read."""
        env = self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        last, modules, masks_of, get = self.user_to_last_uses, self.submodules, self.masks, env.__getitem__
        for node in self.graph.nodes:
            op = node.op
            if op == "output":
                return self.graph.process_outputs(map_arg(node.args[0], get))
            args, kwargs = plain_containers(map_arg(node.args, get)), map_arg(node.kwargs, get)
            masks = masks_of.get(node)
            if masks is not None:
                args, kwargs = list(args), dict(kwargs)
                for arg, mask, fill in masks:  # in site order, as insert_hard_masks chains them
                    where = args if isinstance(arg, int) else kwargs
                    where[arg] = torch.where(mask.to(where[arg].device), where[arg], fill)
            if op == "call_module":
                env[node] = modules[node.target](*args, **kwargs)
            elif op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # placeholder, get_attr
                env[node] = getattr(self, op)(node.target, tuple(args), kwargs)
            for dead in last.get(node, ()):
                del env[dead]


class SiteMask(torch.nn.Module):
    """Applies a flat mask vector at one mask site, index-mapped to the site's positions.

    Training mode multiplies by the (soft) mask; eval mode selects with ``torch.where``
    on the hard mask. ``cls``/``sg`` hold, per position, the flat id of the position's
    group channel and site-group channel (the last entry of the vector is a constant 1).
    """

    def __init__(self, cls_ids, sg_ids, axis: int, ndim: int, fill: float):
        super().__init__()
        self.register_buffer("cls", torch.as_tensor(cls_ids, dtype=torch.long), persistent=False)
        self.register_buffer("sg", torch.as_tensor(sg_ids, dtype=torch.long), persistent=False)
        shape = [1] * ndim
        shape[axis % ndim] = len(cls_ids)
        self.shape = shape
        self.fill = fill

    def forward(self, x, masks):
        m = (masks[self.cls] * masks[self.sg]).reshape(self.shape).to(x.dtype)
        if self.training:
            return x * m
        return torch.where(m > 0.5, x, self.fill)


def insert_soft_masks(gm: fx.GraphModule, site_ids: list, bank: torch.nn.Module, bank_args: list[str]) -> None:
    """Insert ``bank`` (called once, on the get_attr targets ``bank_args``) at the top of
    ``gm`` and a ``SiteMask`` before every site; ``site_ids`` lists ``(site_node, arg,
    axis, fill, cls_ids, sg_ids)`` with ids into the bank's vector (-1 = always kept)."""
    gm.add_submodule("_softprune_bank", bank)
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        args = [graph.get_attr(t) for t in bank_args]
        masks = graph.call_module("_softprune_bank", tuple(args))
    for k, (node, arg, axis, fill, cls_ids, sg_ids) in enumerate(site_ids):
        x = node.args[arg] if isinstance(arg, int) else node.kwargs[arg]
        name = f"_softprune_site{k}"
        gm.add_submodule(name, SiteMask(cls_ids, sg_ids, axis, x.meta["val"].dim(), fill))
        with graph.inserting_before(node):
            y = graph.call_module(name, (x, masks))
        if isinstance(arg, int):
            args_ = list(node.args)
            args_[arg] = y
            node.args = tuple(args_)
        else:
            node.kwargs = {**node.kwargs, arg: y}
    gm.recompile()
