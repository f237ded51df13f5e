"""Attention blocks for the zoo, written as the ecosystem writes them.

Couplings: ``F.scaled_dot_product_attention`` on ``(batch, heads, tokens, dim)`` views of
separate q/k/v projections; Hugging Face ViT's explicit ``scale`` and its context reshape
``size()[:-2] + (all_head_size,)``; the default scale (surgery must write it out); grouped
query attention (fewer k/v heads, ``enable_gqa``); value dim != query dim; the context view unpacked from a
concatenated size (``view(*(size()[:-2] + (c,)))``); timm's fused qkv, unbound from a (3, heads, dim) view; attention by ``torch.einsum`` and by ``@`` with heads; timm CaiT's class attention, whose
head sizes come from ``x.shape`` of a stream that carries no channels (the class token's
cat), so they do not follow the projections' pruning; a patch-embed conv + BN stem, a
(1, tokens, C) position embedding and a pre-norm residual stream.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from .zoo_common import BATCH, finish, seeded
except ImportError:  # imported with tests/ on sys.path
    from zoo_common import BATCH, finish, seeded


class HFSelfAttention(nn.Module):
    """Hugging Face ViTSelfAttention + ViTSelfOutput with the SDPA attention function."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads, self.head_size, self.all_head_size = heads, c // heads, c
        self.scaling = self.head_size ** -0.5
        self.query, self.key, self.value = (nn.Linear(c, c) for _ in range(3))
        self.dense = nn.Linear(c, c)

    def forward(self, x):
        b = x.shape[0]
        shape = (b, -1, self.heads, self.head_size)
        q = self.query(x).view(*shape).transpose(1, 2)
        k = self.key(x).view(*shape).transpose(1, 2)
        v = self.value(x).view(*shape).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scaling)
        ctx = ctx.transpose(1, 2).contiguous()
        ctx = ctx.reshape(ctx.size()[:-2] + (self.all_head_size,))
        return self.dense(ctx)


class GQAttention(nn.Module):
    """Grouped-query attention: 4 query heads, 2 key/value heads, value dim 6 != query dim 4,
    the default scale, and a padding mask that carries no channels."""

    def __init__(self, c, heads=4, kv_heads=2, dq=4, dv=6):
        super().__init__()
        self.h, self.kvh, self.dq, self.dv = heads, kv_heads, dq, dv
        self.q, self.k = nn.Linear(c, heads * dq), nn.Linear(c, kv_heads * dq)
        self.v = nn.Linear(c, kv_heads * dv, bias=False)
        self.proj = nn.Linear(heads * dv, c)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.h, self.dq).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.kvh, self.dq).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.kvh, self.dv).permute(0, 2, 1, 3)
        mask = x.new_zeros((n, n))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        o = o.transpose(1, 2).contiguous()
        return self.proj(o.view(*(o.size()[:-2] + (self.h * self.dv,))))  # HF Data2Vec: getitem of add


class TimmAttention(nn.Module):
    """timm's Attention: one fused qkv projection viewed as (3, heads, dim) and unbound, the
    context reshaped back to the stream's ``C`` read from its shape; with the fused kernel,
    or without it (``(q * scale) @ k.transpose(-2, -1)``, softmax, ``@ v``), as timm has."""

    def __init__(self, c, heads=2, fused=True):
        super().__init__()
        self.h, self.d, self.fused = heads, c // heads, fused
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q * self.d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class EinsumAttention(nn.Module):
    """Attention written with ``torch.einsum`` (heads x dim views, the dim contracted in the
    scores and carried by the values), the context flattened with constants."""

    def __init__(self, c, heads=2):
        super().__init__()
        self.h, self.d = heads, c // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.h, self.d) for f in (self.q, self.k, self.v))
        att = torch.einsum("bnhd,bmhd->bhnm", q, k).mul(self.d ** -0.5).softmax(-1)
        return self.proj(torch.einsum("bhnm,bmhd->bnhd", att, v).reshape(b, n, self.h * self.d))


class ClassAttention(nn.Module):
    """timm CaiT's ClassAttn: the class token alone queries, and every head size is
    ``C // heads`` with ``C`` read from the input's shape at run time."""

    def __init__(self, c, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.h, C // self.h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.h, C // self.h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.h, C // self.h).permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, 1, C))


class Block(nn.Module):
    def __init__(self, c, attn):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(c), attn, nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """Conv-BN patch embedding, HF-style, GQA and timm-style blocks and a class-attention
    block, mean-pooled head."""

    def __init__(self, c=16):
        super().__init__()
        self.embed, self.bn = nn.Conv2d(3, c, 4, 4), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c, HFSelfAttention(c, 4)), Block(c, GQAttention(c)),
                                    Block(c, TimmAttention(c)), Block(c, EinsumAttention(c)),
                                    Block(c, TimmAttention(c, fused=False)))
        self.pos_embed = nn.Parameter(torch.randn(1, 16, c))
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.cls_norm, self.cls_attn = nn.LayerNorm(c), ClassAttention(c)
        self.norm, self.head = nn.LayerNorm(c), nn.Linear(c, 5)

    def forward(self, x):
        x = self.bn(self.embed(x)).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        u = torch.cat((cls, x), dim=1)
        cls = cls + self.cls_attn(self.cls_norm(u))  # CaiT's token-only block
        return self.head(self.norm(torch.cat((cls, x), dim=1)).mean(1))


class AreaAttention(nn.Module):
    """ultralytics YOLO12's AAttn: a 1x1 qkv conv viewed per token as heads x [q | k | v] and
    split, ``q^T @ k``, ``v @ attn^T``, a depthwise positional conv on v; ``area`` > 1
    folds areas of the image into the batch."""

    def __init__(self, c, heads=2, area=2):
        super().__init__()
        self.num_heads, self.head_dim, self.area, self.all_head_dim = heads, c // heads, area, c
        self.qkv = nn.Sequential(nn.Conv2d(c, 3 * c, 1, bias=False), nn.BatchNorm2d(3 * c))
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.pe = nn.Sequential(nn.Conv2d(c, c, 5, 1, 2, groups=c, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        B, _, H, W = x.shape
        N = H * W
        qkv = self.qkv(x).flatten(2).transpose(1, 2)
        if self.area > 1:
            qkv = qkv.reshape(B * self.area, N // self.area, self.all_head_dim * 3)
            B, N, _ = qkv.shape
        q, k, v = (qkv.view(B, N, self.num_heads, self.head_dim * 3).permute(0, 2, 3, 1)
                   .split([self.head_dim, self.head_dim, self.head_dim], dim=2))
        attn = ((q * (self.head_dim ** -0.5)).transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).permute(0, 3, 1, 2)
        v = v.permute(0, 3, 1, 2)
        if self.area > 1:
            x = x.reshape(B // self.area, N * self.area, self.all_head_dim)
            v = v.reshape(B // self.area, N * self.area, self.all_head_dim)
            B, N, _ = x.shape
        x = x.reshape(B, H, W, self.all_head_dim).permute(0, 3, 1, 2).contiguous()
        v = v.reshape(B, H, W, self.all_head_dim).permute(0, 3, 1, 2).contiguous()
        return self.proj(x + self.pe(v))


class AreaNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.attn = AreaAttention(c)
        self.mix = nn.Sequential(nn.Conv2d(c, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.attn(x)
        return self.head(self.mix(x).mean((2, 3)))


def area_attention():
    seeded()
    return finish(AreaNet(), (BATCH, 3, 16, 16))


def vit_sdpa():
    seeded()
    return finish(TinyViT(), (BATCH, 3, 16, 16))


ZOO_ATTENTION = {"vit_sdpa": vit_sdpa, "area_attention": area_attention}
