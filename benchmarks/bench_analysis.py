"""Analysis speed: softprune-fx ``analyze`` vs Torch-Pruning ``DependencyGraph.build_dependency``.

Command (about 4 minutes on 2 cores)::

    pip install torch-pruning --no-deps      # once; needs only torch and numpy
    python benchmarks/bench_analysis.py      # --repeats 9 --growth-repeats 3 --quick

Three parts, each timed interleaved (the order of the two tools alternates every repeat,
one untimed warm-up call per tool first, ``gc.collect()`` before each call, the collector
left on (paused inside softprune-fx's stages, as ``analyze`` pauses it), one torch thread unless --threads), medians of the repeats, and the ratio = median of the per-repeat ratios:

1. The full-size zoo models (``tests/zoo_big.py``: ResNet-50, MobileNetV2 1.0,
   DenseNet-121 at 224 px, batch 1). softprune-fx's time is split into the stages
   ``analyze`` runs: capture (``passes.capture.capture``: the specialising trace, which
   records each node's meta value as it records the node), analysis (``run_flow`` +
   ``build_groups`` + ``ChannelGraph``).
   Torch-Pruning's ``build_dependency`` (a real forward with autograd at full resolution)
   is timed alone, and its group scan ``list(DG.get_all_groups())`` beside it.
   Targets (issue 5): total <= Torch-Pruning's build; total minus the capture <= half of it.
2. Input resolution: ResNet-50 at 224 and 1024 px.
3. Growth: synthetic residual nets (generator below) from ~100 to ~10,000 fx nodes; time
   against node count and the log-log least-squares exponent of each tool.

Writes ``benchmarks/results/bench_analysis.json``.
"""
from __future__ import annotations

import argparse

import _common as C
import torch
import torch.nn as nn
import torch_pruning as tp
from zoo_big import BIG, resnet50

from softprune_fx.passes.capture import capture
from softprune_fx.passes.gcpause import gc_paused
from softprune_fx.passes.flow import run_flow
from softprune_fx.passes.groups import build_groups
from softprune_fx.graph import ChannelGraph


# ----------------------------------------------------------------------------- tools
def softprune_staged(model, inputs) -> dict:
    """``softprune_fx.analyze(model, inputs)``, stage by stage (same calls, same order):
    capture (the specialising trace, meta values recorded as each node is), then the
    channel flow and the groups. Capture is the single source of shapes: no shape pass.
    Both stages run with the cyclic collector paused, as ``analyze`` runs them (gcpause.py)."""
    with gc_paused():
        t_trace, gm = C.timed(capture, model, inputs)

    def analysis():
        flow = run_flow(gm)
        return ChannelGraph(gm, flow, build_groups(flow), inputs)
    with gc_paused():
        t_an, cg = C.timed(analysis)
    return {"trace": t_trace, "analysis": t_an,
            "total": t_trace + t_an, "nodes": len(gm.graph.nodes), "groups": len(cg.groups)}


def tp_build(model, inputs, scan: bool = False) -> dict:
    t_build, dg = C.timed(tp.DependencyGraph().build_dependency, model, example_inputs=inputs)
    out = {"build": t_build}
    if scan:
        t_scan, groups = C.timed(lambda: list(dg.get_all_groups()))
        out.update(scan=t_scan, build_scan=t_build + t_scan, groups=len(groups))
    return out


def interleaved(model, inputs, repeats: int, scan: bool = True) -> tuple[list, list]:
    softprune_staged(model, inputs)
    tp_build(model, inputs, scan)
    sp, tpr = [], []
    for r in range(repeats):
        if r % 2:
            tpr.append(tp_build(model, inputs, scan))
            sp.append(softprune_staged(model, inputs))
        else:
            sp.append(softprune_staged(model, inputs))
            tpr.append(tp_build(model, inputs, scan))
    return sp, tpr


def summary(sp: list, tpr: list) -> dict:
    s = {k: C.med([r[k] for r in sp]) for k in ("trace", "analysis", "total")}
    s.update({f"tp_{k}": C.med([r[k] for r in tpr]) for k in tpr[0]})
    s["ratio_total"] = C.med([a["total"] / b["build"] for a, b in zip(sp, tpr)])
    s["ratio_no_trace"] = C.med([(a["total"] - a["trace"]) / b["build"] for a, b in zip(sp, tpr)])
    s["spread_sp"] = C.spread([r["total"] for r in sp])
    s["spread_tp"] = C.spread([r["build"] for r in tpr])
    s["nodes"], s["groups"] = sp[0]["nodes"], sp[0]["groups"]
    return s


# ----------------------------------------------------------------------------- synthetic nets
class Block(nn.Module):
    """Post-activation basic block; a 1x1 projection when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.proj = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                           nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + (x if self.proj is None else self.proj(x)))


def synthetic_resnet(blocks: int, per_stage: int = 4) -> nn.Module:
    """A residual net of ``blocks`` basic blocks (about 7.5 fx nodes each), the width
    cycling 8, 12, 16, 20 every ``per_stage`` blocks (one residual group per stage);
    run at 8x8 px so the forward pass is negligible for either tool."""
    torch.manual_seed(0)
    layers, c = [nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()], 8
    for i in range(blocks):
        cout = 8 + 4 * ((i // per_stage) % 4)
        layers.append(Block(c, cout))
        c = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers).eval()


def models(args, out: dict) -> None:
    """Part 1: the full-size zoo models."""
    rows, out["models"] = [], {}
    for name, build in BIG.items():
        model, inputs = build()
        s = summary(*interleaved(model, inputs, args.repeats))
        out["models"][name] = s
        rows.append([name, s["nodes"], s["trace"], s["analysis"], s["total"], s["tp_build"],
                     s["tp_scan"], s["ratio_total"], s["ratio_no_trace"],
                     f"{s['spread_sp']:.2f}/{s['spread_tp']:.2f}"])
    C.console.print(C.table(
        f"Analysis time (s, median of {args.repeats}, torch threads {torch.get_num_threads()})",
        ["model", "nodes", "capture", "analysis", "softprune total", "TP build", "TP scan",
         "total/TP", "(total-capture)/TP", "spread sp/TP"], rows))


def resolution(args, out: dict) -> None:
    """Part 2: ResNet-50 at 224 and 1024 px."""
    rows, out["resolution"] = [], {}
    model, _ = resnet50()
    for px in (224, 1024):
        x = (torch.randn(1, 3, px, px),)
        s = summary(*interleaved(model, x, max(3, args.repeats // 3), scan=False))
        out["resolution"][px] = s
        rows.append([f"resnet50 @ {px} px", s["trace"], s["analysis"], s["total"], s["tp_build"],
                     s["ratio_total"]])
    C.console.print(C.table("Input resolution (s, median)", ["model", "capture", "analysis",
                                                             "softprune total", "TP build", "total/TP"], rows))


def growth_part(args, out: dict) -> None:
    """Part 3: synthetic residual nets, ~100 to ~10,000 nodes."""
    sizes = [12, 40, 130, 400] + ([] if args.quick else [1330])
    rows, growth = [], []
    x = (torch.randn(1, 3, 8, 8),)
    for blocks in sizes:
        model = synthetic_resnet(blocks)
        sp, tpr = interleaved(model, x, args.growth_repeats)
        s = summary(sp, tpr)
        s["blocks"] = blocks
        growth.append(s)
        rows.append([blocks, s["nodes"], s["groups"], s["total"], s["total"] - s["trace"], s["analysis"],
                     s["tp_build"], s["tp_scan"], s["tp_build_scan"], s["ratio_total"]])
        C.console.print(f"  growth: {blocks} blocks, {s['nodes']} nodes done", style="dim")
    n = [g["nodes"] for g in growth]
    fits = {k: C.fit_exponent(n, [g[k] for g in growth])
            for k in ("total", "analysis", "trace", "tp_build", "tp_scan", "tp_build_scan")}
    fits["no_trace"] = C.fit_exponent(n, [g["total"] - g["trace"] for g in growth])
    top = growth[-3:]
    fits_top = {k: C.fit_exponent([g["nodes"] for g in top], [g[k] for g in top])
                for k in ("total", "analysis", "tp_build", "tp_build_scan")}
    out["growth"], out["exponent_all"], out["exponent_top3"] = growth, fits, fits_top
    rows.append(["exponent", "", "", fits["total"], fits["no_trace"], fits["analysis"], fits["tp_build"],
                 fits["tp_scan"], fits["tp_build_scan"], ""])
    rows.append(["exp. top 3", "", "", fits_top["total"], "", fits_top["analysis"], fits_top["tp_build"], "",
                 fits_top["tp_build_scan"], ""])
    C.console.print(C.table(
        f"Growth: synthetic residual nets at 8x8 px (s, median of {args.growth_repeats})",
        ["blocks", "nodes", "groups", "softprune total", "minus trace", "analysis", "TP build", "TP scan",
         "TP build+scan", "total/TP build"], rows))


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--growth-repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="growth up to ~3,000 nodes only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--parts", default="models,resolution,growth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    out: dict = {"repeats": args.repeats, "growth_repeats": args.growth_repeats, "threads": args.threads}
    suffix = "" if (args.threads == 1 and len(parts) == 3) else f"_{'_'.join(parts)}_t{args.threads}"
    if "models" in parts:
        models(args, out)
    if "resolution" in parts:
        resolution(args, out)
    if "growth" in parts:
        growth_part(args, out)
    C.write_json("bench_analysis" + suffix, out)


if __name__ == "__main__":
    main()
