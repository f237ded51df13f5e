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

from contextlib import contextmanager
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
    silent: bool = False     # its activation gives exactly 0 at 0: gamma = beta = 0 silences the entry


def _zero_at_zero(node: fx.Node, modules) -> bool:
    """Whether the activation a node calls outputs exactly 0 for input 0 (ReLU, SiLU, GELU,
    Mish, Hardswish: yes; sigmoid, softplus, Hardsigmoid: no), by calling it on a zero."""
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in rest):
        return False
    x = torch.zeros(1)
    try:
        with torch.no_grad():
            if node.op == "call_module":
                y = modules[node.target](x)
            elif node.op == "call_function":
                y = node.target(x, *node.args[1:], **node.kwargs)
            else:
                y = getattr(x, node.target)(*node.args[1:], **node.kwargs)
    except Exception:  # noqa: BLE001 - an activation we cannot call on a zero is not silenced
        return False
    return isinstance(y, torch.Tensor) and bool((y == 0).all())


def _activation_after(node: fx.Node, modules, delta: float, depth: int = 3) -> tuple[float, bool] | None:
    """(dead threshold, zero at zero) of the activation this value reaches directly or through adds."""
    for user in node.users:
        t = dead_threshold(user, modules, delta)
        if t is not None:
            return t, _zero_at_zero(user, modules)
        if depth and _bn_role(user, modules) == "through":  # a residual add (registry)
            found = _activation_after(user, modules, delta, depth - 1)
            if found is not None:
                return found
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
        found = _activation_after(node, modules, delta)
        lay = cg.flow.layouts.get(node)
        if found is None or not isinstance(lay, np.ndarray):
            continue
        t, silent = found
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
            out.append(BNSite(params[0], params[1], chans[ok], flat[ok], float(t), silent))
    return out


@contextmanager
def silenced(sites: list[BNSite], getter, flat: np.ndarray):
    """Within the block, the BN entries of the flat channels ``flat`` (bool per flat id) have
    gamma = beta = 0 wherever their activation gives 0 at 0, so those channels output 0 there
    as their mask 0 made them in the masked model; restored after. Returns the count of
    flat channels touched. Why: finalize's rounding may keep a channel whose gate training
    closed; its consumers were trained without it, and its stale output cost digits' GELU
    ResNet 1-6 points (BENCHMARKS.md section 10). Through a residual add the other operands
    are the channel's own sites in the nets measured; a non-BN operand stays as it is."""
    saved = []
    touched = np.zeros(len(flat), bool)
    try:
        with torch.no_grad():
            for s in sites:
                sel = flat[s.flat] & s.silent
                if not sel.any():
                    continue
                ch = torch.as_tensor(s.channel[sel])
                for target in (s.gamma, s.beta):
                    param = getter(target)
                    saved.append((param, ch, param[ch].clone()))
                    param[ch] = 0.0
                touched[s.flat[sel]] = True
        yield int(touched.sum())
    finally:
        with torch.no_grad():
            for param, ch, old in reversed(saved):
                param[ch] = old


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
