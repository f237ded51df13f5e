"""``torch.einsum``: each operand axis is a letter; a letter that carries channels keeps
them through the contraction.

A letter kept in the output carries its atoms there (every operand that has it unifies
them, as a broadcast does); a contracted letter is a mask site on the first operand that
carries it (a zero channel adds nothing to the sum, as in a matmul). Conservative where
the analysis would have to guess: an operand with channels on several axes (but a
(heads x dim) grid, whose dim columns are unified across heads, as attention prunes), a repeated
letter (a diagonal), channels on more than one output letter or on more than one
contracted letter, operands given as a list, or an operand of fixed size on a channel
letter (its channels are frozen instead).

Example::

    attn = torch.einsum("bhqd,bhkd->bhqk", q, k)   # d contracted: a mask site on q
    out = torch.einsum("bhqk,bhkd->bhqd", attn, v)  # d carried to the output
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from ..atoms import NONE, along, carrying_axes, filled, known_grid, on_axis
from ..registry import FlopsTerm, register


def parse(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """The letters of each operand and of the output, with ``...`` spelled out as one
    private letter per broadcast axis (aligned from the right); None when unreadable."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    spans = [nd - (len(t) - 3) if "..." in t else 0 for t, nd in zip(terms, ndims)]
    width = max(spans, default=0)
    ell = [chr(0x100 + i) for i in range(width)]  # never an equation letter
    full = [t.replace("...", "".join(ell[width - k:])) for t, k in zip(terms, spans)]
    if any(len(t) != nd for t, nd in zip(full, ndims)):
        return None
    if not arrow:  # implicit output: the letters seen once, in alphabetical order
        seen = "".join(full)
        rhs = "".join(ell) + "".join(sorted(c for c in set(seen) if seen.count(c) == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", "".join(ell))
    return full, rhs


def _operands(node) -> list | None:
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        return None  # torch.einsum(eq, [a, b]): a site cannot name a list item
    return ops


def einsum_rule(ctx, node):
    """Letters carrying channels unify across operands; a contracted one is a mask site."""
    ops = _operands(node)
    if ops is None or not all(isinstance(a, fx.Node) for a in ops):
        return ctx.unknown(f"{ctx.where()}: operands as a list or constants")
    vals = [ctx.val(a) for a in ops]
    parsed = parse(node.args[0], [v.dim() for v in vals])
    if parsed is None or any(len(set(t)) != len(t) for t in parsed[0]):
        return ctx.unknown(f"{ctx.where()}: an equation with repeated letters or not read")
    terms, out = parsed
    lays = [ctx.layout(a) for a in ops]
    lays = [lay.reshape((1,) * (v.dim() - lay.ndim) + lay.shape) for lay, v in zip(lays, vals)]
    batch = set(out).intersection(*map(set, terms))
    for i, (t, lay, v) in enumerate(zip(terms, lays, vals)):
        axes = carrying_axes(lay)
        if len(axes) > 1:  # (heads x dim): the same dim positions in every head, as attention prunes
            own = [d for d in axes if t[d] not in batch]
            if len(own) != 1 or not known_grid(lay):
                return ctx.unknown(f"{ctx.where()}: an operand carries channels on several axes")
            lays[i] = on_axis(ctx.unify_columns(lay, own[0], v.shape[own[0]]), own[0], v.dim())
    letters = {t[carrying_axes(lay)[0]] for t, lay in zip(terms, lays) if carrying_axes(lay) and (lay >= 0).any()}
    kept, contracted = [c for c in letters if c in out], [c for c in letters if c not in out]
    if len(kept) > 1 or len(contracted) > 1:
        return ctx.unknown(f"{ctx.where()}: channels on several letters")
    result = filled(NONE, len(out))
    for c in letters:
        vecs = []
        for i, (t, lay, v) in enumerate(zip(terms, lays, vals)):
            if c not in t or v.shape[t.index(c)] == 1:
                continue
            vec = along(lay, t.index(c), v.shape[t.index(c)])
            if vec is None or not (vec >= 0).any():  # fixed size on a channel letter
                others = [along(o, s.index(c), w.shape[s.index(c)]) for s, o, w in zip(terms, lays, vals)
                          if c in s and o is not lay]
                ctx.freeze([o for o in others if o is not None], f"{ctx.where()}: contracted with a tensor of fixed size")
                continue
            vecs.append((i, vec))
        atoms = ctx.unify(*[vec for _, vec in vecs]) if vecs else None
        if atoms is None:
            continue
        if c in out:
            result = on_axis(atoms, out.index(c), len(out))
        else:
            i = vecs[0][0]
            ctx.site(1 + i, atoms, terms[i].index(c), "matmul")
    return result


def einsum_flops(node, modules, site, layout=None):
    """FlopCounterMode counts a two-operand einsum that contracts a letter of both as one
    batched matmul: 2 x the product of the extents of the letters in both operands or in the
    output (a letter in one operand only is summed away first); one that contracts nothing
    between them is a multiply, 0 FLOPs. As ``coef * I * O``: I the kept channels of the site's letter
    when it is counted, O those of the output letter that carries channels. None for other
    arities (their FLOPs stay in the constant)."""
    ops = _operands(node)
    if ops is None or len(ops) != 2:
        return None
    vals = [o.meta["val"] for o in ops]
    parsed = parse(node.args[0], [v.dim() for v in vals])
    if parsed is None:
        return None
    (ta, tb), out = parsed
    extent = {}
    for t, v in zip((ta, tb), vals):
        for c, n in zip(t, v.shape):
            extent[c] = max(extent.get(c, 1), n)
    if not any(c in tb and c not in out for c in ta):
        return None  # nothing contracted between them: torch multiplies, FlopCounterMode counts 0
    counted = [c for c in extent if (c in ta and c in tb) or c in out]
    coef = 2.0 * math.prod(extent[c] for c in counted)
    per_input = site is not None and parsed[0][site.arg - 1][site.axis] in counted
    if per_input:
        coef /= extent[parsed[0][site.arg - 1][site.axis]]
    axes = carrying_axes(layout) if isinstance(layout, np.ndarray) else []
    if axes:
        coef /= extent[out[axes[0]]]
    if not per_input and not axes:
        return None
    return FlopsTerm(coef, per_input, axes[0] if axes else None)


register(torch.einsum, flops=einsum_flops)(einsum_rule)
