"""One test per registry key of the shape (passes/ops/shape.py) and slicing
(passes/ops/slicing.py) families."""
import operator

import pytest
import torch
import torch.nn.functional as F
from harness import case_ids, check
from torch import nn

M = lambda s, x: s.m(x)  # noqa: E731
def _level_table(s, x):
    """RT-DETR's table of level shapes, written in place: it carries no channels."""
    table = x.new_zeros(2, 2)
    table[0, 1] = x.shape[3]
    return x + table.sum()


def _overwrite_channel(s, x):
    y = x * 2
    y[:, 0] = 0.0  # the readers of y would not see the write
    return y


def _select_tokens(s, x, width=None):
    """DETR-style query selection: the top tokens by score, gathered with an index repeated
    over the channels (by the stream's own width, or by a constant one)."""
    t = x.flatten(2).transpose(1, 2)  # (N, tokens, C)
    order = torch.argsort(t.detach().sum(-1), dim=1)[:, :40]
    return torch.gather(t, 1, order.unsqueeze(-1).repeat(1, 1, width or t.shape[2])).transpose(1, 2)


CASES = [
    # reshapes (the head reads the result: 3-d -> conv1d, 5-d -> conv3d, 2-d -> linear)
    (torch.reshape, lambda s, x: torch.reshape(x, (2, 8, 64)), None, True),
    (torch.flatten, lambda s, x: torch.flatten(x, 2), None, True),
    (torch.flatten, lambda s, x: torch.flatten(x, 1), None, True),  # into a linear: atoms repeat
    (torch.squeeze, lambda s, x: torch.squeeze(x.amax(3, keepdim=True), 3), None, True),
    (torch.unsqueeze, lambda s, x: torch.unsqueeze(x, 2), None, True),
    (nn.Flatten, M, nn.Flatten(2), True),
    (nn.Unflatten, lambda s, x: s.m(x.flatten(2)), nn.Unflatten(2, (8, 8)), True),
    ("view", lambda s, x: x.view(2, 8, 64), None, True),
    ("view", lambda s, x: x.view(2, 2, 4, 8, 8).transpose(1, 2).reshape(2, 8, 8, 8), None, True),  # shuffle
    ("reshape", lambda s, x: x.reshape(2, 8, -1), None, True),
    ("flatten", lambda s, x: x.flatten(2), None, True),
    ("unflatten", lambda s, x: x.flatten(2).unflatten(2, (8, 8)), None, True),
    ("squeeze", lambda s, x: x.unsqueeze(2).squeeze(2), None, True),
    ("unsqueeze", lambda s, x: x.unsqueeze(2), None, True),
    ("view_as", lambda s, x: x.flatten(2).view_as(x), None, True),
    ("reshape_as", lambda s, x: x.flatten(2).reshape_as(x), None, True),
    # sizes: Hugging Face's shape + tuple follows the channel count it holds; a split sized by
    # a number read from another axis (CaiT's C // heads of an untracked stream) stays as traced
    ("reshape", lambda s, x: x.reshape(x.size()[:2] + (64,)), None, True),
    ("reshape", lambda s, x: x.reshape(2, 2, x.shape[2] // 2, 8, 8).reshape(2, 8, 8, 8), None,
     "sized by a run-time value"),
    # a count of a's channels sizing another axis: pure (C // 4) is written out by surgery;
    # mixed with the batch size (B * C // 8) it is not a constant, and a is frozen
    ("reshape", lambda s, x: x * x.amax(1).reshape(x.shape[1] // 4, 1, 8, 8), None, True),
    ("reshape", lambda s, x: x * x.amax(1).reshape(x.shape[0] * x.shape[1] // 8, 1, 8, 8), None,
     "a channel count sizes an axis"),
    ("reshape", lambda s, x: x * x.amax(1).reshape(x.transpose(0, 1).shape[0] // 4, 1, 8, 8), None,
     "a channel count sizes an axis"),  # read from axis 0, where a merged batch would look alike
    # permutes
    ("permute", lambda s, x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), None, True),
    ("transpose", lambda s, x: x.transpose(1, 3).transpose(1, 3), None, True),
    ("t", lambda s, x: x.mean((2, 3)).t().t(), None, True),
    ("movedim", lambda s, x: x.movedim(1, -1).movedim(-1, 1), None, True),
    ("swapaxes", lambda s, x: x.swapaxes(1, 2).swapaxes(1, 2), None, True),
    (torch.permute, lambda s, x: torch.permute(torch.permute(x, (0, 2, 3, 1)), (0, 3, 1, 2)), None, True),
    (torch.transpose, lambda s, x: torch.transpose(torch.transpose(x, 1, 2), 1, 2), None, True),
    (torch.movedim, lambda s, x: torch.movedim(torch.movedim(x, 1, 3), 3, 1), None, True),
    (torch.swapaxes, lambda s, x: torch.swapaxes(torch.swapaxes(x, 1, 3), 1, 3), None, True),
    (torch.t, lambda s, x: torch.t(torch.t(x.mean((2, 3)))), None, True),
    # expand
    ("expand", lambda s, x: x.mean(1, keepdim=True).expand(-1, x.size(1), -1, -1) * x, None, True),
    ("expand", lambda s, x: x.mean(1, keepdim=True).expand(-1, 8, -1, -1) * x, None, "expanded to a constant size"),
    ("expand_as", lambda s, x: x.mean(1, keepdim=True).expand_as(x) + x, None, True),
    # a ViT's class token, copied over the batch: -1 keeps the channel axis as it is
    ("expand", lambda s, x: torch.cat([x.mean((2, 3), keepdim=True).expand(-1, -1, 1, 8), x], 2), None, True),
    # a spatial broadcast to a constant shape is frozen: the constant would not follow pruning
    (torch.broadcast_to, lambda s, x: torch.broadcast_to(x.mean((2, 3), keepdim=True), (2, 8, 8, 8)) + x, None,
     "expanded over many"),
    # cat / stack
    (torch.cat, lambda s, x: torch.cat([x, x.relu()], 1), None, True),
    (torch.concat, lambda s, x: torch.concat([x.relu(), x], 1), None, True),
    (torch.concatenate, lambda s, x: torch.concatenate([x.relu(), x], 1), None, True),
    (torch.cat, lambda s, x: torch.cat([x, x.relu()], 2), None, True),  # along space: layouts unify
    (torch.cat, lambda s, x: torch.cat([x, x.new_zeros((2, 8, 1, 8))], 2), None, "cannot follow"),  # fixed size
    (torch.cat, lambda s, x: torch.cat([x, x.roll(1, 1)], 2), None, "rolls the channel axis"),  # unknown piece
    (torch.stack, lambda s, x: torch.stack([x, x * 2], 0).mean(0), None, True),
    # shuffles and GLU
    (nn.PixelShuffle, M, nn.PixelShuffle(2), True),
    (F.pixel_shuffle, lambda s, x: F.pixel_shuffle(x, 2), None, True),
    (nn.PixelUnshuffle, M, nn.PixelUnshuffle(2), True),
    (F.pixel_unshuffle, lambda s, x: F.pixel_unshuffle(x, 2), None, True),
    (nn.ChannelShuffle, M, nn.ChannelShuffle(2), True),
    (torch.channel_shuffle, lambda s, x: torch.channel_shuffle(x, 2), None, True),
    (torch.native_channel_shuffle, lambda s, x: torch.native_channel_shuffle(x, 2), None, True),
    (nn.GLU, M, nn.GLU(1), True),
    (F.glu, lambda s, x: F.glu(x, 1), None, True),
    # shape queries
    (getattr, lambda s, x: x.flatten(2).view(x.shape[0], x.shape[1], 8, 8), None, True),
    ("size", lambda s, x: x.view(x.size(0), x.size(1), -1), None, True),
    ("numel", lambda s, x: x / x.numel(), None, "channel count is used as a number"),
    ("nelement", lambda s, x: x / x.nelement(), None, "channel count is used as a number"),
    (torch.numel, lambda s, x: x / torch.numel(x), None, "channel count is used as a number"),
    ("dim", lambda s, x: x.flatten(x.dim() - 2), None, True),
    ("element_size", lambda s, x: x * x.element_size(), None, True),
    # slicing family
    (torch.split, lambda s, x: torch.cat(torch.split(x, [3, 5], 1)[::-1], 1), None, True),
    (torch.chunk, lambda s, x: torch.chunk(x, 2, 1)[0] * torch.chunk(x, 2, 1)[1], None, True),
    (torch.tensor_split, lambda s, x: torch.cat(torch.tensor_split(x, [3, 5], dim=1)[::-1], 1), None, True),
    ("split", lambda s, x: torch.cat(x.split(4, 1)[::-1], 1), None, True),
    # a grid of channel blocks (2 heads x [q | k]) split along its second axis (YOLO12's area attention)
    ("split", lambda s, x: torch.cat([p.flatten(1, 2) for p in x.view(2, 2, 4, 8, 8).split([3, 1], 2)], 1), None, True),
    ("chunk", lambda s, x: (lambda q, k: q * k)(*x.view(2, 2, 4, 8, 8).chunk(2, 2)).reshape(2, 4, 8, 8), None, True),
    ("chunk", lambda s, x: x.chunk(2, 1)[1], None, True),
    ("tensor_split", lambda s, x: torch.cat(x.tensor_split(2, 1)[::-1], 1), None, True),
    ("split_with_sizes", lambda s, x: torch.cat(x.split_with_sizes([3, 5], 1)[::-1], 1), None, True),
    (torch.unbind, lambda s, x: torch.stack(torch.unbind(x, 2), 2), None, True),
    ("unbind", lambda s, x: x.unbind(1)[0].unsqueeze(1) + x, None, "unbinds the channel axis"),
    ("unbind", lambda s, x: torch.cat(x.view(2, 2, 4, 8, 8).unbind(1), 1), None, True),  # timm's qkv
    (torch.roll, lambda s, x: torch.roll(x, (1, -2), (2, 3)), None, True),  # Swin's shifted windows
    (torch.roll, lambda s, x: torch.roll(x, 3), None, "rolls the channel axis"),  # flattened
    ("roll", lambda s, x: x.roll(1, dims=1), None, "rolls the channel axis"),
    (torch.flip, lambda s, x: torch.flip(x, (1, 3)) + x, None, True),
    ("flip", lambda s, x: x.flip(1, 2), None, True),
    ("flip", lambda s, x: torch.cat([x, x.flip(-1)], 1), None, True),
    (torch.narrow, lambda s, x: torch.narrow(x, 1, 2, 4), None, True),
    ("narrow", lambda s, x: x.narrow(1, 0, 6) + x.narrow(1, 2, 6), None, True),
    (operator.getitem, lambda s, x: x[:, 2:7], None, True),
    (operator.getitem, lambda s, x: x[:, ::2, 1:], None, True),
    (operator.getitem, lambda s, x: x[:, 3:4] * x, None, True),
    # blocks of a (2, 4) channel grid picked by int (segformer's kv[0], kv[1]); single channels frozen
    (operator.getitem, lambda s, x: (lambda kv: kv[:, 0] * kv[:, 1])(x.view(2, 2, 4, 8, 8)), None, True),
    (operator.getitem, lambda s, x: x[:, 2:3] * x[:, 5].unsqueeze(1), None, "picks single channels"),
    (operator.setitem, _level_table, None, True),
    (torch.gather, _select_tokens, None, True),
    (torch.gather, lambda s, x: _select_tokens(s, x, 8), None, "does not follow the channels"),
    ("gather", lambda s, x: x.flatten(2).gather(2, torch.argsort(x.detach().sum(1).flatten(1), 1).unsqueeze(1)
                                                .expand(-1, x.shape[1], -1)), None, True),
    ("gather", lambda s, x: x.gather(1, torch.arange(8).flip(0).view(1, 8, 1, 1).expand_as(x)), None,
     "gathers along a channel axis"),
    ("repeat", lambda s, x: x.repeat(1, 2, 1, 1), None, True),
    ("repeat", lambda s, x: x * x.mean(1, keepdim=True).repeat(1, 1, 1, 1), None, True),
    ("repeat", lambda s, x: x.flatten(2).repeat(2, 1, 1), None, True),
    (operator.setitem, _overwrite_channel, None, "written in place"),
    (F.pad, lambda s, x: F.pad(x, (1, 1, 1, 1)), None, True),
    (F.pad, lambda s, x: F.pad(x, (0, 0, 0, 0, 2, 1)), None, True),  # channel pad: owned channels
]



@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_shape_slicing_key(case):
    key, op, module, expect = case
    check(key, op, expect, module)


def test_an_int_pick_unifies_the_blocks_position_by_position():
    """``x.view(n, 2, 4, h, w)[:, 1]`` picks a row of a (2, 4) channel grid: the rows are
    unified column by column (4 classes), so no column can move. ``[:, :, 1]`` picks a column:
    each row becomes one class (2), which the grid's whole-column rule then keeps together."""
    from harness import build

    import softprune_fx as sp
    for pick, classes in ((lambda v: v[:, 1], 4), (lambda v: v[:, :, 1], 2)):
        net, x = build(lambda s, x, pick=pick: pick(x.view(2, 2, 4, 8, 8)))
        group = next(g for g in sp.analyze(net, x).groups if "a" in g.producers)
        assert len(group.classes) == classes, group
