"""The FLOPs cost model: FLOPs of the model for any keep vector, and per-channel marginals.

FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts (2 x multiply-adds of
conv, linear and matmul; bias and BN not counted). Every prunable mixing op contributes
``coef * I * O`` (dense or grouped conv, linear), ``coef * O`` (depthwise conv) or
``coef * I`` (matmul), where I and O are its kept input and output channel counts; all
other FLOPs are a constant, measured once.

Example::

    cost = CostModel(cg, index, model, inputs)
    cost.flops(np.ones(index.size))      # == FlopCounterMode's count of the model
    cost.marginal(keep)                  # FLOPs removed per channel, to first order
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from softprune_fx.passes import rules_mixing
from softprune_fx.passes.atoms import along
from softprune_fx.passes.flops import count_flops
from softprune_fx.passes.registry import lookup, node_arg

from .index import ChannelIndex


@dataclass
class Term:
    node: str
    coef: float
    in_cls: np.ndarray | None   # flat ids per input position (-1 = always kept), None: not counted
    in_sg: np.ndarray | None
    out: np.ndarray | None      # flat ids per output channel, None: not counted


def _numel(shape) -> int:
    return int(math.prod(shape))



class CostModel:
    def __init__(self, cg, index: ChannelIndex, model: nn.Module, example_inputs, total: int | None = None):
        self.index = index
        self.terms: list[Term] = []
        modules = dict(cg.gm.named_modules())
        sites = {}
        for s in cg.flow.sites:
            sites.setdefault(s.node, s)
        for node in cg.gm.graph.nodes:
            term = self._term(cg, node, lookup(node, modules), modules, sites.get(node))
            if term is not None:
                self.terms.append(term)
        self.total0 = int(total if total is not None else count_flops(model, example_inputs))
        full = np.ones(index.size)
        self.constant = self.total0 - self._variable(full)

    def _term(self, cg, node, entry, modules, site) -> Term | None:
        if entry is None or entry.rule not in (rules_mixing.conv_rule, rules_mixing.linear_rule,
                                               rules_mixing.functional_weight_rule, rules_mixing.matmul_rule):
            return None
        out = node.meta["val"]
        x = node_arg(node, 0, "input").meta["val"]
        lay = cg.flow.layouts.get(node)
        if not isinstance(out, torch.Tensor) or not isinstance(lay, np.ndarray):
            return None
        in_cls, in_sg = self.index.site_ids(site) if site is not None else (None, None)
        if entry.rule is rules_mixing.matmul_rule:
            if site is None:
                return None
            return Term(node.name, 2.0 * _numel(out.shape), in_cls, in_sg, None)
        is_linear = entry.rule is rules_mixing.linear_rule or node.target is torch.nn.functional.linear
        axis = -1 if is_linear else 1
        vec = along(lay, axis, out.shape[axis])
        out_ids = self.index.atom_ids(vec) if vec is not None else None
        if is_linear:
            w = modules[node.target].weight if node.op == "call_module" else node_arg(node, 1, "weight").meta["val"]
            flops = 2.0 * _numel(out.shape[:-1]) * w.shape[1] * w.shape[0]
            return Term(node.name, flops / (w.shape[1] * w.shape[0]), in_cls, in_sg, out_ids)
        if node.op == "call_module":
            m = modules[node.target]
            w, groups = m.weight, m.groups
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        else:
            w, groups, transposed = node_arg(node, 1, "weight").meta["val"], 1, False
        kernel = _numel(w.shape[2:])
        cin, cout = x.shape[1], out.shape[1]
        spatial = _numel(x.shape) // cin if transposed else _numel(out.shape) // cout
        flops = 2.0 * spatial * cin * cout // groups * kernel
        if site is None:  # depthwise: FLOPs follow the kept channels
            return Term(node.name, flops / cout, None, None, out_ids)
        return Term(node.name, flops / (cin * cout), in_cls, in_sg, out_ids)

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _ext(keep: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(keep, dtype=float), 1.0)

    def _counts(self, t: Term, k: np.ndarray) -> tuple[float, float]:
        i = float((k[t.in_cls] * k[t.in_sg]).sum()) if t.in_cls is not None else 1.0
        o = float(k[t.out].sum()) if t.out is not None else 1.0
        return i, o

    def _variable(self, keep: np.ndarray) -> float:
        k = self._ext(keep)
        total = 0.0
        for t in self.terms:
            i, o = self._counts(t, k)
            total += t.coef * i * o
        return total

    def flops(self, keep: np.ndarray) -> float:
        """FLOPs of the model whose kept channels are ``keep`` (bool or soft weights)."""
        return self.constant + self._variable(keep)

    def ratio(self, keep: np.ndarray) -> float:
        """Fraction of FLOPs removed: ``1 - F(keep) / F0``."""
        return 1.0 - self.flops(keep) / self.total0

    def marginal(self, keep: np.ndarray) -> np.ndarray:
        """dF/dkeep per flat channel: the FLOPs one channel costs, given the others."""
        k = self._ext(keep)
        grad = np.zeros(len(k))
        for t in self.terms:
            i, o = self._counts(t, k)
            if t.in_cls is not None:
                np.add.at(grad, t.in_cls, t.coef * o * k[t.in_sg])
                np.add.at(grad, t.in_sg, t.coef * o * k[t.in_cls])
            if t.out is not None:
                np.add.at(grad, t.out, t.coef * i)
        return grad[:-1]
