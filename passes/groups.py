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

from .atoms import along, unique_ints
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

    # node-free fields no pass edits after the analysis: a fork shares them (copying the
    # channel lists of every group was most of a fork's time)
    SHARED = ("classes", "frozen_channels", "producers", "sites", "kinds", "members")

    @property
    def prunable(self) -> bool:
        return len(self.frozen_channels) < self.width

    @property
    def is_site_group(self) -> bool:
        return self.site is not None


def build_groups(flow: ChannelFlow, frozen: tuple = ()) -> list[Group]:
    """Coupling groups (in first-producer order) followed by site groups."""
    table = flow.table
    roots = table.roots
    owner_of = np.asarray(table.owner_of, dtype=np.int64)
    creating = np.array([o.kind in CREATING_KINDS for o in table.owners], dtype=bool)
    # which owners each class holds; norms and other channel-wise owners follow their
    # inputs and never link groups, unless a class has no creating owner at all
    n_owners = max(len(table.owners), 1)
    keys = unique_ints(roots * n_owners + owner_of) if len(roots) else np.zeros(0, np.int64)
    pairs = np.stack([keys // n_owners, keys % n_owners], 1)  # (class, owner), sorted by class
    has_creating = np.zeros(len(roots), dtype=bool)
    has_creating[pairs[creating[pairs[:, 1]], 0]] = True
    linking = pairs[creating[pairs[:, 1]] | ~has_creating[pairs[:, 0]]]
    owners_uf = UnionFind(range(len(table.owners)))
    same = linking[1:, 0] == linking[:-1, 0]  # sorted by class: a class's owners are adjacent
    edges = unique_ints(linking[:-1][same, 1] * n_owners + linking[1:][same, 1]) if len(linking) > 1 else []
    for e in np.asarray(edges, dtype=np.int64).tolist():
        owners_uf.union(e // n_owners, e % n_owners)
    lead = np.array([owners_uf[o] for o in range(len(table.owners))], dtype=np.int64)
    root_lead = np.full(len(roots), -1, dtype=np.int64)
    root_lead[linking[:, 0]] = lead[linking[:, 1]]
    by_lead: dict[int, list[int]] = {}
    for o in range(len(table.owners)):
        by_lead.setdefault(int(lead[o]), []).append(o)
    frozen_roots: dict[int, str] = {}
    for atom, reason in table.frozen.items():
        frozen_roots.setdefault(int(roots[atom]), reason)
    is_frozen = np.zeros(len(roots), dtype=bool)
    is_frozen[np.fromiter(frozen_roots, dtype=np.int64, count=len(frozen_roots))] = True
    readers = _site_readers(flow, roots, root_lead)
    tags_by_lead = _pairs([atoms for _, atoms in table.tags], [tag for tag, _ in table.tags], root_lead, roots)
    groups = []
    for members in sorted(by_lead.values(), key=min):
        cand = roots[np.concatenate([table.owners[o].atoms for o in members])]
        cand = cand[root_lead[cand] == lead[members[0]]]
        _, first = unique_ints(cand, return_index=True)
        classes_array = cand[np.sort(first)]
        classes = classes_array.tolist()
        if not classes:
            continue
        names = [table.owners[o].name for o in members]
        gid = names[0]
        fz = np.flatnonzero(is_frozen[classes_array]).tolist()
        reason = frozen_roots[classes[fz[0]]] if fz else ""
        if any(_names_within(n, f) for f in frozen for n in names):
            fz, reason = list(range(len(classes))), "frozen by the user"
        kinds = set(tags_by_lead.get(int(lead[members[0]]), ())) - {"norm"}
        site_names = sorted(readers.get(int(lead[members[0]]), ()))
        producers = [n for o, n in zip(members, names) if creating[o]]
        groups.append(Group(gid, len(classes), classes, fz, reason, producers or names[:1], site_names,
                            kinds, names))
    groups += _site_groups(flow, roots, frozen)
    return groups


def _names_within(name: str, prefix: str) -> bool:
    """Whether ``name`` (a module path, or a site group's ``<consumer>:in``) lies in the
    module ``prefix``: at a dot or colon boundary, so "features.1" holds "features.1.conv"
    and "features.1:in" but not "features.10.conv1:in"."""
    return name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + ":")


def _site_name(site: Site) -> str:
    node = site.node
    return str(node.target) if node.op == "call_module" else node.name


def _pairs(chunks: list[np.ndarray], labels: list, root_lead: np.ndarray, roots: np.ndarray) -> dict[int, set]:
    """{group lead: labels} from per-label atom arrays, with one vectorised unique."""
    if not chunks:
        return {}
    atoms = np.concatenate(chunks)
    which = np.repeat(np.arange(len(chunks)), [len(c) for c in chunks])
    keys = unique_ints(root_lead[roots[atoms]] * len(chunks) + which)
    out: dict[int, set] = {}
    for lead, k in zip((keys // len(chunks)).tolist(), (keys % len(chunks)).tolist()):
        out.setdefault(lead, set()).add(labels[k])
    return out


def _site_readers(flow: ChannelFlow, roots: np.ndarray, root_lead: np.ndarray) -> dict[int, set[str]]:
    """Names of the mask sites reading each group (by its lead owner)."""
    chunks = [site.atoms[site.atoms >= 0] for site in flow.sites]
    return _pairs(chunks, [_site_name(site) for site in flow.sites], root_lead, roots)


def _chain_kind(node: fx.Node, modules) -> str | None:
    """'param' for a channel-wise op with per-channel parameters, 'plain' for one
    without, None for anything that cannot sit in a site group's chain (the registry
    entry's ``chain`` role)."""
    entry = lookup(node, modules)
    role = entry.chain if entry is not None else None
    if callable(role):
        role = role(modules.get(node.target) if node.op == "call_module" else None, node)
    if role == "norm":
        return "param"
    if role == "pass" and (node.op != "call_module" or not list(modules[node.target].parameters(recurse=False))):
        return "plain"
    return None


def _site_groups(flow: ChannelFlow, roots: np.ndarray, frozen: tuple) -> list[Group]:
    gm = flow.gm
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    readers = np.zeros(len(roots) + 1, dtype=np.int64)  # distinct sites reading each class
    for site in flow.sites:
        readers[unique_ints(roots[site.atoms[site.atoms >= 0]])] += 1
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
        # C reads every class of T through the chain; another site must read one too
        if not (readers[roots[atoms[atoms >= 0]]] > 1).any():
            continue
        gid = f"{_site_name(site)}:in"
        fz = list(range(width)) if any(_names_within(gid, f) for f in frozen) else []
        out.append(Group(gid, width, [], fz, "frozen by the user" if fz else "", [str(x.name)],
                         [_site_name(site)], {"site"}, [], site=site, chain=chain, source=x))
    return out
