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

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from softprune_fx.passes.atoms import along
from softprune_fx.passes.flops import count_flops
from softprune_fx.passes.ops import lookup, node_arg

from .index import ChannelIndex


@dataclass
class Term:
    node: str
    coef: float
    in_cls: np.ndarray | None   # flat ids per input position (-1 = always kept), None: not counted
    in_sg: np.ndarray | None
    out: np.ndarray | None      # flat ids per output channel, None: not counted


class CostModel:
    def __init__(self, cg, index: ChannelIndex, model: nn.Module, example_inputs, total: int | str | None = None):
        """``total``: FlopCounterMode's count of the model (None: counted here). ``"terms"``:
        the sum of the registry's terms, with no forward; ``from_terms`` is then True and a
        caller must confirm it with ``agrees`` on a counted forward before reporting it."""
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
        full = np.ones(index.size)
        self.from_terms = total == "terms"
        if self.from_terms:
            total = round(self._variable(full))
        self.total0 = int(total if total is not None else count_flops(model, example_inputs))
        self.constant = self.total0 - self._variable(full)

    def agrees(self, keep: np.ndarray, counted: int) -> bool:
        """Whether the model predicts ``counted`` (FlopCounterMode's count of the model
        pruned to ``keep``) exactly. When the terms alone give the original's count they
        give every pruned one too: a FLOP they miss (an op without a term, a leaf) shows up
        here as a difference, so the terms' total is reported only after this holds."""
        return abs(self.flops(keep) - counted) <= 1e-9 * max(counted, 1)

    def _term(self, cg, node, entry, modules, site) -> Term | None:
        """The node's FLOPs term from its registry entry (``OpEntry.flops``), mapped to flat ids."""
        if entry is None or entry.flops is None:
            return None
        out = node.meta["val"]
        lay = cg.flow.layouts.get(node)
        if not isinstance(out, torch.Tensor) or not isinstance(lay, np.ndarray):
            return None
        spec = entry.flops(node, modules, site is not None)
        if spec is None:
            return None
        in_cls, in_sg = self.index.site_ids(site) if spec.per_input and site is not None else (None, None)
        out_ids = None
        if spec.out_axis is not None:
            vec = along(lay, spec.out_axis, out.shape[spec.out_axis])
            out_ids = self.index.atom_ids(vec) if vec is not None else None
        return Term(node.name, spec.coef, in_cls, in_sg, out_ids)

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
