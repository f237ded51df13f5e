"""BN-activation sites: which BN channels decide, by SCP, whether a channel is alive.

A BN feeds an activation with a dead region (the op registry's ``dead_threshold``: ReLU,
ReLU6 ``x <= 0``; Hardswish ``x <= -3``; SiLU about ``x <= -4.49`` at ``delta = 0.05``)
directly or through residual adds. Its channel c scores every flat channel that c's
position belongs to: the channel's group class and, for a BN in a site group's chain,
the site-group position too. A flat channel with several sites uses the product of
their deactivation probabilities.

Example::

    sites = find_bn_sites(cg, index)
    sites[0].gamma, sites[0].beta, sites[0].flat, sites[0].threshold
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from softprune_fx.passes.atoms import along
from softprune_fx.passes.ops import dead_threshold, lookup

from .index import ChannelIndex


@dataclass
class BNSite:
    gamma: str               # get_attr target of the BN weight
    beta: str                # get_attr target of the BN bias
    channel: np.ndarray      # BN channel of each entry
    flat: np.ndarray         # flat channel id of each entry
    threshold: float


def _activation_after(node: fx.Node, modules, delta: float, depth: int = 3) -> float | None:
    """Dead threshold of the activation this value reaches directly or through adds."""
    for user in node.users:
        t = dead_threshold(user, modules, delta)
        if t is not None:
            return t
        if depth and _bn_role(user, modules) == "through":  # a residual add (registry)
            t = _activation_after(user, modules, delta, depth - 1)
            if t is not None:
                return t
    return None


def _bn_role(node: fx.Node, modules) -> str | None:
    """The registry entry's ``bn`` role: "site" (BatchNorm), "through" (add) or None."""
    entry = lookup(node, modules) if node.op in ("call_module", "call_function", "call_method") else None
    return entry.bn if entry is not None else None


def _bn_params(node: fx.Node, modules) -> tuple[str, str] | None:
    if _bn_role(node, modules) != "site":
        return None
    if node.op == "call_module":
        m = modules[node.target]
        return (f"{node.target}.weight", f"{node.target}.bias") if m.affine else None
    if node.op == "call_function":
        w = node.args[3] if len(node.args) > 3 else node.kwargs.get("weight")
        b = node.args[4] if len(node.args) > 4 else node.kwargs.get("bias")
        if getattr(w, "op", None) == "get_attr" and getattr(b, "op", None) == "get_attr":
            return w.target, b.target
    return None


def find_bn_sites(cg, index: ChannelIndex, delta: float = 0.05) -> list[BNSite]:
    """Every BN channel that feeds an activation with a dead region (``delta``: a smooth
    activation's tolerance, ``SCPConfig.delta``)."""
    modules = dict(cg.gm.named_modules())
    chain_group = {n: g for g in cg.groups for n in g.chain}
    out = []
    for node in cg.gm.graph.nodes:
        params = _bn_params(node, modules)
        if params is None:
            continue
        t = _activation_after(node, modules, delta)
        lay = cg.flow.layouts.get(node)
        if t is None or not isinstance(lay, np.ndarray):
            continue
        width = node.meta["val"].shape[1]
        atoms = along(lay, 1, width)
        if atoms is None:
            continue
        flat = index.atom_ids(atoms)
        chans = np.arange(width)
        g = chain_group.get(node)
        if g is not None:  # the site group's positions, and the classes it reads
            sg = index.ids(g.id)
            flat = np.concatenate([flat, np.where(index.frozen[sg], -1, sg)])
            chans = np.concatenate([chans, chans])
        ok = flat >= 0
        if ok.any():
            out.append(BNSite(params[0], params[1], chans[ok], flat[ok], float(t)))
    return out


def bn_log_probabilities(sites: list[BNSite], getter, size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p per flat channel, has-a-BN-site mask): log of the product over the channel's
    sites, in log space throughout (a live channel behind SiLU has p below float32's range).

    ``getter(target)`` returns the parameter tensor for a get_attr target.
    """
    from .scp import combine_log_sites, log_deactivation_prob
    logp = torch.zeros(size)
    has = torch.zeros(size, dtype=torch.bool)
    for s in sites:
        gamma, beta = getter(s.gamma), getter(s.beta)
        ch = torch.as_tensor(s.channel)
        lp = log_deactivation_prob(gamma[ch], beta[ch], s.threshold, eps)
        logp = logp.to(lp.dtype) + combine_log_sites(lp, torch.as_tensor(s.flat), size).to(logp.device)
        has[torch.as_tensor(s.flat)] = True
    return logp, has


def bn_probabilities(sites: list[BNSite], getter, size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p per flat channel, has-a-BN-site mask): ``exp`` of ``bn_log_probabilities``."""
    logp, has = bn_log_probabilities(sites, getter, size, eps)
    return torch.exp(logp), has
