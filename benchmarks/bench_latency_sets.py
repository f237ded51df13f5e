"""Issue 12's FLOPs-mode check, is it reachable at all: keep sets of one model at the same
FLOPs cut, timed together interleaved (``python bench_latency.py --target keep-sets``, which
parses the arguments and calls ``bench_keep_sets``)::

    python benchmarks/bench_latency.py --target keep-sets --models resnet50 --ratios 0.4 --threads-list 2 1

Writes ``benchmarks/results/bench_latency_keep_sets[_tag].json``.
"""
from __future__ import annotations

import os
import tempfile

import _common as C
import numpy as np
import torch
from zoo_big import BIG
from zoo_common import randomize_norms

import softprune_fx
from bench_latency import scp_kept, torch_pruning_cut


def bench_keep_sets(args) -> None:
    """``--target keep-sets`` (is issue 12's FLOPs-mode 0.97 reachable on this CPU?): keep sets
    of the first ``--models`` at a FLOPs cut near ``--ratios[0]`` (the default, round_to 32 /
    64 / 128, none, Torch-Pruning uniform 8 / 16, the latency-mode decision for each of
    ``--threads-list`` at a latency cut of ``--keep-latency-ratio``), timed together interleaved
    ``--measurements`` times per thread count: paired latency cut / FLOPs cut, SCP kept."""
    from softprune_fx.latency import measure_samples, paired_cut
    from softprune_fx.passes.flops import count_flops
    name, ratio = args.models.split(",")[0], args.ratios[0]
    model, inputs = BIG[name]()
    randomize_norms(model, seed=0)
    model.eval()
    batch = torch.randn(args.batch, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(1))
    os.environ["SOFTPRUNE_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="latcold_")   # the default: fixed step
    f0, models, info = count_flops(model, inputs), {"orig": model}, {}
    for key, rt in (("auto", "auto"), ("round_to 32", 32), ("round_to 64", 64), ("round_to 128", 128), ("none", None)):
        models[key], _ = softprune_fx.prune_one_shot(model, inputs, ratio, round_to=rt)
    for step in (8, 16):
        models[f"torch-pruning {step}"] = torch_pruning_cut(model, inputs, ratio, step)[0].eval()
    cache = args.latency_cache or tempfile.mkdtemp(prefix="latcache_")
    for threads in args.threads_list:
        models[f"latency mode t{threads}"], _ = softprune_fx.prune_one_shot(
            model, inputs, args.keep_latency_ratio, target="latency", ort_threads=threads, latency_cache=cache)
    os.environ.pop("SOFTPRUNE_LATENCY_CACHE")
    for key, m in models.items():
        if key != "orig":
            info[key] = dict(flops_cut=1 - count_flops(m, inputs) / f0, scp_kept=scp_kept(model, m),
                             widths=[c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)], cuts={})
            C.console.print(f"  {key}: FLOPs cut {info[key]['flops_cut']:.3f}, SCP kept {info[key]['scp_kept']:.3f}")
    loads = []
    for m in range(args.measurements):
        for threads in args.threads_list:
            load = os.getloadavg()[0]
            loads.append(load)
            raw = measure_samples(models, batch, threads, warmup=args.warmup, repeats=args.repeats)
            for key, row in info.items():
                row["cuts"].setdefault(threads, []).append(paired_cut(raw[key], raw["orig"]))
            C.console.print(f"  #{m} t{threads} load {load:.1f}, orig {np.median(raw['orig']):.1f} ms: " + ", ".join(
                f"{k} {r['cuts'][threads][-1] / r['flops_cut']:.2f}" for k, r in info.items()))
    rows = [[k, r["flops_cut"], r["scp_kept"]] + [float(np.median(r["cuts"][t])) / r["flops_cut"]
                                                  for t in args.threads_list] for k, r in info.items()]
    C.console.print(C.table(f"{name}: latency cut / FLOPs cut (median of {args.measurements} paired runs, "
                            f"load {min(loads):.1f}-{max(loads):.1f})",
                            ["keep set", "FLOPs cut", "SCP kept"] + [f"t{t}" for t in args.threads_list], rows))
    C.write_json("bench_latency_keep_sets" + (f"_{args.tag}" if args.tag else ""),
                 {"model": name, "ratio": ratio, "repeats": args.repeats, "loads": loads, "sets": info})
