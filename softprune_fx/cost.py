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
            self.terms.extend(self._terms(cg, node, lookup(node, modules), modules, sites.get(node)))
        self._pack()
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

    def _terms(self, cg, node, entry, modules, site) -> list[Term]:
        """The node's FLOPs terms from its registry entry (``OpEntry.flops``: one term, or a
        tuple of them, as attention's two products), mapped to flat ids."""
        if entry is None or entry.flops is None:
            return []
        out = node.meta["val"]
        lay = cg.flow.layouts.get(node)
        if not isinstance(out, torch.Tensor) or not isinstance(lay, np.ndarray):
            return []
        specs = entry.flops(node, modules, site, lay)
        specs = () if specs is None else specs if isinstance(specs, tuple) else (specs,)
        terms = []
        for spec in specs:
            in_cls, in_sg = self.index.site_ids(site) if spec.per_input and site is not None else (None, None)
            out_ids = None
            if spec.out_axis is not None:
                vec = along(lay, spec.out_axis, out.shape[spec.out_axis])
                out_ids = self.index.atom_ids(vec) if vec is not None else None
            terms.append(Term(node.name, spec.coef, in_cls, in_sg, out_ids))
        return terms

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _ext(keep: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(keep, dtype=float), 1.0)

    def _counts(self, t: Term, k: np.ndarray) -> tuple[float, float]:
        i = float((k[t.in_cls] * k[t.in_sg]).sum()) if t.in_cls is not None else 1.0
        o = float(k[t.out].sum()) if t.out is not None else 1.0
        return i, o

    def _pack(self) -> None:
        """The terms as flat arrays, so evaluating them is a few bincounts, not a loop over
        terms (the decision and the training controller evaluate the model many times).
        Position ids of -1 ("always kept") point at the extra last entry of ``_ext``."""
        n, T = self.index.size + 1, len(self.terms)
        self._coef = np.array([t.coef for t in self.terms], dtype=float)
        ins = [(j, t) for j, t in enumerate(self.terms) if t.in_cls is not None]
        outs = [(j, t) for j, t in enumerate(self.terms) if t.out is not None]
        cat = (lambda parts: np.concatenate(parts).astype(np.int64) % n if parts else np.zeros(0, np.int64))
        self._in_cls, self._in_sg = cat([t.in_cls for _, t in ins]), cat([t.in_sg for _, t in ins])
        self._in_term = np.repeat([j for j, _ in ins], [len(t.in_cls) for _, t in ins]).astype(np.int64)
        self._out = cat([t.out for _, t in outs])
        self._out_term = np.repeat([j for j, _ in outs], [len(t.out) for _, t in outs]).astype(np.int64)
        self._no_in = np.ones(T, bool)
        self._no_in[[j for j, _ in ins]] = False
        self._no_out = np.ones(T, bool)
        self._no_out[[j for j, _ in outs]] = False
        # per-term sums as add.reduceat over each term's contiguous run of positions (terms
        # come in order), which is several times faster than a bincount with weights
        self._in_runs, self._out_runs = _runs(self._in_term), _runs(self._out_term)
        self._in_sg_const = bool((self._in_sg == n - 1).all())  # no site group: nothing to multiply

    def _all_counts(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_counts`` of every term at once: kept inputs and outputs per term."""
        w = k[self._in_cls] if self._in_sg_const else k[self._in_cls] * k[self._in_sg]
        i, o = _run_sums(w, self._in_runs, len(self.terms)), _run_sums(k[self._out], self._out_runs, len(self.terms))
        i[self._no_in], o[self._no_out] = 1.0, 1.0
        return i, o

    def _variable(self, keep: np.ndarray) -> float:
        i, o = self._all_counts(self._ext(keep))
        return float((self._coef * i * o).sum())

    def flops(self, keep: np.ndarray) -> float:
        """FLOPs of the model whose kept channels are ``keep`` (bool or soft weights)."""
        return self.constant + self._variable(keep)

    def ratio(self, keep: np.ndarray) -> float:
        """Fraction of FLOPs removed: ``1 - F(keep) / F0``."""
        return 1.0 - self.flops(keep) / self.total0

    def marginal(self, keep: np.ndarray) -> np.ndarray:
        """dF/dkeep per flat channel: the FLOPs one channel costs, given the others."""
        k = self._ext(keep)
        n = len(k)
        i, o = self._all_counts(k)
        per_in = (self._coef * o)[self._in_term]
        grad = (np.bincount(self._in_cls, weights=per_in * k[self._in_sg], minlength=n)
                + np.bincount(self._in_sg, weights=per_in * k[self._in_cls], minlength=n)
                + np.bincount(self._out, weights=(self._coef * i)[self._out_term], minlength=n))
        return grad[:-1]


def _runs(term_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(term, start) of each run of equal entries in the sorted ``term_of``."""
    if not len(term_of):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = np.flatnonzero(np.concatenate([[True], term_of[1:] != term_of[:-1]]))
    return term_of[start], start


def _run_sums(values: np.ndarray, runs: tuple, n: int) -> np.ndarray:
    """Per-term sums of ``values`` (0 for a term with no position), from ``_runs``."""
    out = np.zeros(n)
    if len(runs[1]):
        out[runs[0]] = np.add.reduceat(values, runs[1])
    return out
