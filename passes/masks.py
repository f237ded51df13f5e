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
