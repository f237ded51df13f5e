"""Attention: ``F.scaled_dot_product_attention`` (Hugging Face's SDPA attention, timm's
fused attention), with its surgery and FLOPs terms.

What is pruned is the *head dimension*, the same positions in every head: query, key and
value are ``(..., heads, sequence, dim)`` views of projections whose output channels are
``heads x dim``. The query/key dim is contracted (a mask site on the query: a zero query
column removes that term of every score, so its key column goes too), the value dim passes
through to the output. Heads are never dropped, so the head counts of q, k and v (grouped
query attention included) stay as they were. The softmax scale defaults to
``1/sqrt(dim)``: surgery writes the original one explicitly, since the pruned dim is smaller.

Example::

    q = self.q(x).view(b, n, h, d).transpose(1, 2)     # also k, v
    o = F.scaled_dot_product_attention(q, k, v)        # d prunable, per column, in q/k and v
"""
from __future__ import annotations

import math

import numpy as np
import torch.nn.functional as F
from torch import fx

from ..atoms import on_axis
from ..registry import FlopsTerm, node_arg, register

_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _head_columns(ctx, t) -> np.ndarray | None:
    """The 1-D atoms of ``t``'s feature (last) axis, its columns unified across heads; None
    when its channels sit elsewhere (on the sequence or batch axes) or are not all known."""
    lay, v = ctx.layout(t), ctx.val(t)
    nd = v.dim() if hasattr(v, "dim") else 0
    if not isinstance(lay, np.ndarray) or nd < 2 or not (lay >= 0).all():
        return None
    lay = lay.reshape((1,) * (nd - lay.ndim) + lay.shape)
    heads = nd - 3 if nd >= 3 else None
    if any(lay.shape[d] > 1 for d in range(nd) if d not in (heads, nd - 1)):
        return None
    return ctx.unify_columns(lay, nd - 1, v.shape[-1])


def sdpa_surgery(sctx, node) -> None:
    """Write the original default scale ``1/sqrt(dim)`` explicitly (the dim shrinks)."""
    if node_arg(node, 6, "scale") is not None:
        return
    q = node_arg(node, 0, "query")
    scale = 1.0 / math.sqrt(q.meta["val"].shape[-1])
    if len(node.args) > 6:
        node.args = (*node.args[:6], scale, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "scale": scale}


def sdpa_flops(node, modules, site, layout=None):
    """FlopCounterMode's ``2*B*H*L*S*Eq + 2*B*H*L*S*Ev``: one term per contracted (query/key)
    dim at the mask site, one per value dim on the output's last axis."""
    q, k = node_arg(node, 0, "query").meta["val"], node_arg(node, 1, "key").meta["val"]
    scores = 2.0 * math.prod(q.shape[:-1]) * k.shape[-2]
    terms = [FlopsTerm(scores, True, None)] if site is not None else []
    return tuple(terms) + (FlopsTerm(scores, False, -1),)


@register(F.scaled_dot_product_attention, surgery=sdpa_surgery, flops=sdpa_flops)
def sdpa_rule(ctx, node):
    """q/k head dims unify and are a mask site on q; the output carries v's head dims."""
    q, k, v = (node_arg(node, i, _ARGS[i]) for i in range(3))
    mask = node_arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and (np.asarray(ctx.layout(mask)) >= 0).any():
        return ctx.unknown(f"{ctx.where()}: an attention mask that carries channels")
    cols = [_head_columns(ctx, t) for t in (q, k, v)]
    if any(c is None for c in cols):
        return ctx.unknown(f"{ctx.where()}: query, key and value must carry channels on their head "
                           "and feature axes only")
    contracted = ctx.unify(cols[0], cols[1])
    ctx.site(0, contracted, ctx.val(q).dim() - 1, "matmul")
    nd = ctx.out().dim()
    return on_axis(cols[2], nd - 1, nd)
