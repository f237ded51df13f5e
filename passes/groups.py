"""Coupling groups and site groups, built from a finished channel flow.

A *class* is a union-find class of atoms: channels that must be dropped together. A
*group* gathers the classes of producers that share classes (a residual stream is one
group); its channel index i is the i-th class in its first producer's channel order.
A *site group* (DESIGN.md section 3) lets one consumer's private BN-ReLU chain drop
positions of a tensor that other consumers keep (pre-activation ResNets, DenseNets).

Example::

    groups, site_groups = build_groups(flow)
    groups[0].id, groups[0].width, groups[0].prunable
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
from networkx.utils import UnionFind

from .atoms import along
from .flow import ChannelFlow, Site
from .registry import lookup

CREATING_KINDS = {"conv", "linear", "param", "input", "const"}


@dataclass
class Group:
    """A set of channels that are kept or dropped together, indexed 0..width-1."""

    id: str
    width: int
    classes: list[int]
    frozen_channels: list[int]
    frozen_reason: str
    producers: list[str]
    sites: list[str]
    kinds: set[str]
    members: list[str] = field(default_factory=list)
    site: Site | None = None           # site groups only: the consumer's mask site
    chain: list[fx.Node] = field(default_factory=list)
    source: fx.Node | None = None      # site groups only: the tensor T the chain reads

    @property
    def prunable(self) -> bool:
        return len(self.frozen_channels) < self.width

    @property
    def is_site_group(self) -> bool:
        return self.site is not None


def build_groups(flow: ChannelFlow, frozen: tuple = ()) -> list[Group]:
    """Coupling groups (in first-producer order) followed by site groups."""
    table = flow.table
    n = len(table)
    roots = table.find(np.arange(n)) if n else np.zeros(0, dtype=np.int64)
    creating = [o.kind in CREATING_KINDS for o in table.owners]
    root_owners: dict[int, set[int]] = {}
    for atom, root in enumerate(roots.tolist()):
        root_owners.setdefault(root, set()).add(table.owner_of[atom])
    owners_uf = UnionFind()
    for owners in root_owners.values():
        # norms and other channel-wise owners follow their inputs; they never link groups
        linked = sorted(o for o in owners if creating[o]) or sorted(owners)
        owners_uf.union(*linked)
    by_lead: dict[int, list[int]] = {}
    for o in range(len(table.owners)):
        if o in owners_uf.parents:
            by_lead.setdefault(owners_uf[o], []).append(o)
    frozen_roots: dict[int, str] = {}
    for atom, reason in table.frozen.items():
        frozen_roots.setdefault(int(roots[atom]), reason)
    readers = _site_readers(flow, roots)

    def members_of_root(r: int) -> set[int]:
        owners = root_owners[r]
        return {o for o in owners if creating[o]} or owners
    groups = []
    for members in sorted(by_lead.values(), key=min):
        classes, seen = [], set()
        for o in sorted(members):
            for atom in table.owners[o].atoms:
                r = int(roots[atom])
                if r not in seen and members_of_root(r) & set(members):
                    seen.add(r)
                    classes.append(r)
        if not classes:
            continue
        names = [table.owners[o].name for o in sorted(members)]
        gid = names[0]
        fz = [i for i, r in enumerate(classes) if r in frozen_roots]
        reason = frozen_roots[classes[fz[0]]] if fz else ""
        if any(n == f or n.startswith(f + ".") for f in frozen for n in names):
            fz, reason = list(range(len(classes))), "frozen by the user"
        kinds = set()
        for o in members:
            for atom in table.owners[o].atoms:
                kinds |= table.tags.get(int(atom), set())
        kinds.discard("norm")
        site_names = sorted({readers_name for r in classes for readers_name in readers.get(r, ())})
        producers = [table.owners[o].name for o in sorted(members) if table.owners[o].kind in CREATING_KINDS]
        groups.append(Group(gid, len(classes), classes, fz, reason, producers or names[:1], site_names,
                            kinds, names))
    groups += _site_groups(flow, roots, frozen)
    return groups


def _site_name(site: Site) -> str:
    node = site.node
    return str(node.target) if node.op == "call_module" else node.name


def _site_readers(flow: ChannelFlow, roots: np.ndarray) -> dict[int, set[str]]:
    readers: dict[int, set[str]] = {}
    for site in flow.sites:
        for atom in np.unique(site.atoms):
            if atom >= 0:
                readers.setdefault(int(roots[atom]), set()).add(_site_name(site))
    return readers


def _chain_kind(node: fx.Node, modules) -> str | None:
    """'param' for a channel-wise op with per-channel parameters, 'plain' for one
    without, None for anything that cannot sit in a site group's chain."""
    from . import rules_core
    entry = lookup(node, modules)
    if entry is None:
        return None
    if entry.rule in (rules_core.norm_rule, rules_core.functional_norm_rule):
        return "param"
    if entry.rule in (rules_core.same_rule, rules_core.spatial_rule) and node.op != "call_module" or (
            entry.rule in (rules_core.same_rule, rules_core.spatial_rule) and not list(
                modules[node.target].parameters(recurse=False))):
        return "plain"
    return None


def _site_groups(flow: ChannelFlow, roots: np.ndarray, frozen: tuple) -> list[Group]:
    gm = flow.gm
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    class_sites: dict[int, set[int]] = {}
    for k, site in enumerate(flow.sites):
        for atom in np.unique(site.atoms):
            if atom >= 0:
                class_sites.setdefault(int(roots[atom]), set()).add(k)
    out = []
    for k, site in enumerate(flow.sites):
        if site.kind not in ("conv", "linear") or site.axis != 1 or site.arg != 0:
            continue
        if site.node.op == "call_module" and calls.get(site.node.target, 0) != 1:
            continue
        chain, x = [], site.node.args[0]
        while isinstance(x, fx.Node) and len(x.users) == 1 and _chain_kind(x, modules) and (
                x.op != "call_module" or calls.get(x.target, 0) == 1):
            chain.insert(0, x)
            x = x.args[0]
        if not any(_chain_kind(c, modules) == "param" for c in chain) or not isinstance(x, fx.Node):
            continue
        lay = flow.layouts.get(x)
        width = x.meta["val"].shape[1] if hasattr(x.meta.get("val"), "shape") else 0
        atoms = along(lay, 1, width) if isinstance(lay, np.ndarray) and lay.ndim >= 2 else None
        if atoms is None:
            continue
        t_roots = {int(roots[a]) for a in atoms if a >= 0}
        others = set().union(*(class_sites.get(r, set()) for r in t_roots)) - {k} if t_roots else set()
        if not others:
            continue
        gid = f"{_site_name(site)}:in"
        fz = list(range(width)) if any(gid.startswith(f) for f in frozen) else []
        out.append(Group(gid, width, [], fz, "frozen by the user" if fz else "", [str(x.name)],
                         [_site_name(site)], {"site"}, [], site=site, chain=chain, source=x))
    return out
