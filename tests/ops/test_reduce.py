"""One test per registry key of the reduce family (passes/ops/reduce.py): pooling,
resampling and spatial pads pass channels; reductions over channels are exact sites
(sum, mean, max, min, p-norms with p > 0) or frozen as inexact."""
import pytest
import torch
import torch.nn.functional as F
from harness import case_ids, check
from torch import nn


def f3(x):
    return x.flatten(2)  # (N, C, L)


def deep(x):
    return torch.stack([x, x * 2], 2)  # (N, C, 2, H, W)


def on(prep):
    return lambda s, x: s.m(prep(x))


M = lambda s, x: s.m(x)  # noqa: E731
MODULES = [
    (nn.MaxPool1d(2), on(f3)), (nn.MaxPool2d(2), M), (nn.MaxPool3d((1, 2, 2)), on(deep)),
    (nn.AvgPool1d(2), on(f3)), (nn.AvgPool2d(2), M), (nn.AvgPool3d((1, 2, 2)), on(deep)),
    (nn.AdaptiveAvgPool1d(4), on(f3)), (nn.AdaptiveAvgPool2d(2), M), (nn.AdaptiveAvgPool3d(1), on(deep)),
    (nn.AdaptiveMaxPool1d(4), on(f3)), (nn.AdaptiveMaxPool2d(2), M), (nn.AdaptiveMaxPool3d(1), on(deep)),
    (nn.LPPool1d(2, 2), on(lambda x: f3(x).abs() + 0.5)), (nn.LPPool2d(2, 2), on(lambda x: x.abs() + 0.5)),
    (nn.Upsample(scale_factor=2), M), (nn.UpsamplingNearest2d(scale_factor=2), M),
    (nn.UpsamplingBilinear2d(scale_factor=2), M),
    (nn.ReflectionPad1d(1), on(f3)), (nn.ReflectionPad2d(1), M), (nn.ReflectionPad3d(1), on(deep)),
    (nn.ReplicationPad1d(1), on(f3)), (nn.ReplicationPad2d(1), M), (nn.ReplicationPad3d(1), on(deep)),
    (nn.ZeroPad1d(1), on(f3)), (nn.ZeroPad2d(1), M), (nn.ZeroPad3d(1), on(deep)),
    (nn.ConstantPad1d(1, 0.5), on(f3)), (nn.ConstantPad2d(1, 0.5), M), (nn.ConstantPad3d(1, 0.5), on(deep)),
    (nn.CircularPad1d(1), on(f3)), (nn.CircularPad2d(1), M), (nn.CircularPad3d(1), on(deep)),
]
CASES = [(type(m), op, m, True) for m, op in MODULES]
CASES += [(key, op, None, expect) for key, op, expect in [
    (F.max_pool1d, lambda s, x: F.max_pool1d(f3(x), 2), True),
    (F.max_pool2d, lambda s, x: F.max_pool2d(x, 2), True),
    (F.max_pool3d, lambda s, x: F.max_pool3d(deep(x), (1, 2, 2)), True),
    (F.avg_pool1d, lambda s, x: F.avg_pool1d(f3(x), 2), True),
    (F.avg_pool2d, lambda s, x: F.avg_pool2d(x, 2), True),
    (F.avg_pool3d, lambda s, x: F.avg_pool3d(deep(x), (1, 2, 2)), True),
    (F.adaptive_avg_pool1d, lambda s, x: F.adaptive_avg_pool1d(f3(x), 4), True),
    (F.adaptive_avg_pool2d, lambda s, x: F.adaptive_avg_pool2d(x, 2), True),
    (F.adaptive_avg_pool3d, lambda s, x: F.adaptive_avg_pool3d(deep(x), 1), True),
    (F.adaptive_max_pool1d, lambda s, x: F.adaptive_max_pool1d(f3(x), 4), True),
    (F.adaptive_max_pool2d, lambda s, x: F.adaptive_max_pool2d(x, 2), True),
    (F.adaptive_max_pool3d, lambda s, x: F.adaptive_max_pool3d(deep(x), 1), True),
    (F.lp_pool2d, lambda s, x: F.lp_pool2d(x.abs() + 0.5, 2, 2), True),
    (F.interpolate, lambda s, x: F.interpolate(x, scale_factor=2, mode="bilinear"), True),
    (F.interpolate, lambda s, x: F.upsample(x, scale_factor=2), True),  # F.upsample traces to interpolate
    (torch.max_pool2d, lambda s, x: torch.max_pool2d(x, 2), True),
    # reductions: the channel axis (exact sites, or inexact) and spatial axes (channels pass)
    ("sum", lambda s, x: x * x.sum(1, keepdim=True), True),
    ("mean", lambda s, x: x * x.mean(1, keepdim=True), True),
    ("amax", lambda s, x: x * x.amax(1, keepdim=True), True),
    ("amin", lambda s, x: x * x.amin(1, keepdim=True), True),
    ("max", lambda s, x: x * x.max(1, keepdim=True)[0], True),
    ("max", lambda s, x: x * x.max(1, keepdim=True)[1], "uses the arg-max index over channels"),
    ("min", lambda s, x: x * x.min(dim=1, keepdim=True).values, True),
    ("std", lambda s, x: x / x.std(1, keepdim=True), "inexact: std over channels"),
    ("var", lambda s, x: x * x.var((2, 3), keepdim=True), True),
    ("prod", lambda s, x: x * x.prod(1, keepdim=True), "inexact: prod over channels"),
    ("norm", lambda s, x: x / x.norm(dim=(2, 3), keepdim=True), True),
    ("logsumexp", lambda s, x: x - x.logsumexp(1, keepdim=True), "inexact: logsumexp"),
    ("nansum", lambda s, x: x * x.nansum((2, 3), keepdim=True), True),
    ("nanmean", lambda s, x: x * x.nanmean(1, keepdim=True), "inexact: nanmean"),
    (torch.sum, lambda s, x: torch.sum(x, (2, 3), keepdim=True), True),
    (torch.mean, lambda s, x: torch.mean(x, 1, keepdim=True) + x, True),
    (torch.amax, lambda s, x: torch.amax(x, (2, 3), keepdim=True), True),
    (torch.amin, lambda s, x: torch.amin(x, 1, keepdim=True) * x, True),
    (torch.max, lambda s, x: torch.max(x, 3).values, True),
    (torch.min, lambda s, x: torch.min(x, x.relu()), True),  # element-wise form
    (torch.std, lambda s, x: torch.std(x, (2, 3), keepdim=True) * x, True),
    (torch.var, lambda s, x: torch.var(x, 1, keepdim=True) * x, "inexact: var over channels"),
    (torch.prod, lambda s, x: torch.prod(x, 3), True),
    # zeros add nothing to a p-norm with p > 0: over channels it is an exact site, as a sum is;
    # norms read (x, p, dim, keepdim), so a positional p is not taken for the dim
    (torch.norm, lambda s, x: torch.norm(x, dim=1, keepdim=True) * x, True),
    (torch.norm, lambda s, x: torch.norm(x, float("-inf"), 1, True) * x, "inexact: norm over channels"),
    ("norm", lambda s, x: x / x.norm(2, 1, True), True),
    ("norm", lambda s, x: x * x.norm(2, (2, 3), True), True),
    (torch.linalg.vector_norm, lambda s, x: x * torch.linalg.vector_norm(x, 2, (2, 3), True), True),
    (torch.linalg.vector_norm, lambda s, x: x * torch.linalg.vector_norm(x, dim=1, keepdim=True), True),
    (F.normalize, lambda s, x: F.normalize(x, dim=1), True),                 # over channels: a site
    (F.normalize, lambda s, x: F.normalize(x.flatten(2), dim=-1), True),     # over tokens
    (F.normalize, lambda s, x: F.normalize(x, 1.0, 1) + x.relu(), True),
    (F.normalize, lambda s, x: F.normalize(x, -1.0, 1), "inexact: a p-norm with p = -1.0"),
    (F.normalize, lambda s, x: F.normalize(x.view(2, 2, 4, 8, 8), dim=2).view(2, 8, 8, 8), True),  # per head
    (torch.logsumexp, lambda s, x: torch.logsumexp(x, 3), True),
    (torch.nansum, lambda s, x: torch.nansum(x, 1, keepdim=True) * x, True),
    (torch.nanmean, lambda s, x: torch.nanmean(x, 2), True),
    # sampling at points (deformable attention): channels pass, the grid's are frozen
    (F.grid_sample, lambda s, x: F.grid_sample(x, offsets(x), align_corners=False), True),
    (F.grid_sample, lambda s, x: F.grid_sample(x, x[:, :2].permute(0, 2, 3, 1).tanh(), align_corners=False) + x,
     True),  # channels 0 and 1 also steer the grid: frozen, the rest prune
    (F.unfold, lambda s, x: F.unfold(x, 3, padding=1).view(x.shape[0], -1, x.shape[2], x.shape[3]), True),
    (F.unfold, lambda s, x: F.unfold(x, 2, stride=2).view(x.shape[0], x.shape[1], 4, -1).mean(2), True),
    ("unfold", lambda s, x: x.unfold(3, 2, 2).amax(-1), True),
    ("unfold", lambda s, x: x.unfold(1, 2, 2).mean(-1), "windows along the channel axis"),
]]
CASES += [(nn.Unfold, lambda s, x: s.m(x).view(x.shape[0], -1, x.shape[2] - 1, x.shape[3] - 1), nn.Unfold(2), True)]


def offsets(x):
    """A sampling grid from the spatial positions alone (no channels)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs, ys], -1).to(x.dtype).expand(n, h, w, 2) * 0.9



@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_reduce_key(case):
    key, op, module, expect = case
    check(key, op, expect, module)
