"""Real speed-up: ONNX Runtime CPU latency of original vs one-shot pruned models.

Command (about 5 minutes on 2 cores)::

    python benchmarks/bench_latency.py            # --repeats 100 --batch 1 --models resnet50,mobilenetv2_full
    python benchmarks/bench_latency.py --ort-threads 1 --tag ort1
    # diagnosis: python benchmarks/bench_latency.py --models resnet50 --ratios 0.4 --roundings auto 32 64 --tag steps

For the full-size zoo ResNet-50 and MobileNetV2 1.0 (224 px): BN affine parameters and
running statistics are randomised with a fixed seed (``randomize_norms``, seed 0: weight
~ U(0.5, 1.5), bias ~ N(0, 0.2), running_mean ~ N(0, 0.2), running_var ~ U(0.5, 1.5)) as
a stand-in for trained statistics; ``prune_one_shot`` cuts 20%, 40%, 60% of the FLOPs
with the default rounding (``round_to="auto"``) and with ``round_to=None``. Every file is
exported with ``softprune_fx.onnx_check.export_onnx`` and checked against torch (``check_onnx``);
the original and all six pruned files of a model are timed in one interleaved
``ort_latency`` call (round-robin, ``allow_spinning=0``, ORT's default thread count, or
``--ort-threads N``: one thread gives figures that hold while another process holds a
core of this 2-core machine), median and p10/p90. A measurement where any file's
(p90 - p10)/median exceeds 0.25 is repeated (at most twice) and the tightest one kept.

With ``--torch-pruning 8 16`` the same runs also time Torch-Pruning's default pruner
(``MagnitudePruner``, L1 importance, the same ratio in every layer, the classifier
ignored, ``round_to`` 8 and 16), its per-layer ratio bisected to each FLOPs cut, as the
peer reference (needs ``pip install torch-pruning --no-deps``).

Reported: latency cut = 1 - t_pruned / t_orig, FLOPs cut = ``achieved_ratio`` and their
quotient. Issue 4's target: ResNet-50 at 0.4 with the defaults, quotient >= 0.92.
Writes ``benchmarks/results/bench_latency.json``.

``--target latency`` (issue 12) prunes to a fraction of the measured ORT latency instead::

    python benchmarks/bench_latency.py --target latency --threads-list 1 2 --torch-pruning 8 16

per model, ORT thread count and ratio: ``prune_one_shot(target="latency", ort_threads=N)``
(latency tables cold unless ``--latency-cache`` holds them; build seconds reported), its
measured cut (original and pruned interleaved, inside the closed loop), the latency model's
prediction error, FLOPs cut and params; ``auto-table``: FLOPs mode with ``round_to="auto"``
widths from the same tables; Torch-Pruning's uniform pruning bisected on *measured*
latency to the same cut. Writes ``bench_latency_target[_tag].json``.

``--target flops-default`` (issue 12's FLOPs-mode check): the defaults from a cold and a
warm table cache, latency cut / FLOPs cut per ORT thread count, interleaved and repeated::

    python benchmarks/bench_latency.py --target flops-default --models resnet50 --ratios 0.4 --threads-list 2 1

Writes ``bench_latency_flops_default[_tag].json``.

``--target keep-sets``: other keep sets at the same FLOPs cut (round_to 32/64/128, Torch-Pruning,
the latency-mode decision), timed together: is the 0.97 quotient reachable at all::

    python benchmarks/bench_latency.py --target keep-sets --models resnet50 --ratios 0.4 --threads-list 2 1

Writes ``bench_latency_keep_sets[_tag].json``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
from zoo_big import BIG
from zoo_common import randomize_norms

import softprune_fx
from softprune_fx import onnx_check as verify
from softprune_fx.onnx_check import check_onnx, export_onnx, ort_latency

RATIOS = (0.2, 0.4, 0.6)
TARGET = 0.92


def pin_ort_threads(n: int) -> None:
    """Make ``ort_latency``'s sessions use ``n`` intra-op threads (ORT's default: one per core)."""
    def session(path, spinning: bool = True):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = n
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    verify._session = session


def measure(paths: dict, x, warmup: int, repeats: int, max_spread: float = 0.25) -> tuple[dict, int]:
    """ort_latency, repeated while the widest relative spread exceeds ``max_spread`` (3 tries)."""
    best, tries = None, 0
    for tries in range(1, 4):
        stats = ort_latency(paths, x, warmup=warmup, repeats=repeats)
        spread = max((s.p90_ms - s.p10_ms) / s.median_ms for s in stats.values())
        if best is None or spread < best[1]:
            best = (stats, spread)
        if spread <= max_spread:
            break
        C.console.print(f"  spread {spread:.2f} > {max_spread}: measuring again", style="yellow")
    return best[0], tries


def torch_pruning_cut(model, inputs, ratio: float, round_to: int):
    """Torch-Pruning's default (uniform) pruning of a copy, its layer ratio bisected so the
    FLOPs cut is ``ratio`` (as near as its rounding allows)."""
    import copy

    import torch_pruning as tp
    from softprune_fx.passes.flops import count_flops
    f0 = count_flops(model, inputs)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
        tp.pruner.MagnitudePruner(m, inputs[0], importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=mid, ignored_layers=ignored, round_to=round_to).step()
        cut = 1 - count_flops(m, inputs) / f0
        if best is None or abs(cut - ratio) < abs(best[1] - ratio):
            best = (m, cut)
        lo, hi = (mid, hi) if cut < ratio else (lo, mid)
    return best


def bench_model(name: str, args, tmp: Path) -> list[dict]:
    model, inputs = BIG[name]()
    randomize_norms(model, seed=0)
    model.eval()
    batch = torch.randn(args.batch, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(1))
    paths = {"orig": str(tmp / f"{name}_orig.onnx")}
    export_onnx(model, inputs, paths["orig"])
    info = {}
    for ratio in args.ratios:
        for rname in args.roundings:
            rnd = "auto" if rname == "auto" else None if rname == "none" else int(rname)
            start = time.perf_counter()
            pruned, res = softprune_fx.prune_one_shot(model, inputs, ratio, round_to=rnd)
            key = f"{ratio}/{rname}"
            paths[key] = str(tmp / f"{name}_{ratio}_{rname}.onnx")
            export_onnx(pruned, inputs, paths[key])
            chk = check_onnx(pruned, batch, paths[key])
            info[key] = dict(ratio=ratio, rounding=rname, flops_cut=res.achieved_ratio,
                             flops_before=res.flops_before, flops_after=res.flops_after,
                             params_before=res.params_before, params_after=res.params_after,
                             max_abs_diff_torch=res.max_abs_diff, onnx_ok=chk.ok,
                             onnx_max_abs_diff=max(chk.max_abs_diff.values()),
                             rounding_dropped=len(res.rounding_dropped),
                             prune_seconds=time.perf_counter() - start)
            C.console.print(f"  {name} {key}: FLOPs cut {res.achieved_ratio:.3f}, onnx ok {chk.ok}", style="dim")
        for step in args.torch_pruning:
            key = f"{ratio}/torch-pruning {step}"
            peer, cut = torch_pruning_cut(model, inputs, ratio, step)
            paths[key] = str(tmp / f"{name}_{ratio}_tp{step}.onnx")
            export_onnx(peer.eval(), inputs, paths[key])
            chk = check_onnx(peer, batch, paths[key])
            info[key] = dict(ratio=ratio, rounding=f"torch-pruning {step}", flops_cut=cut,
                             params_before=sum(p.numel() for p in model.parameters()),
                             params_after=sum(p.numel() for p in peer.parameters()), onnx_ok=chk.ok,
                             onnx_max_abs_diff=max(chk.max_abs_diff.values()))
            C.console.print(f"  {name} {key}: FLOPs cut {cut:.3f}, onnx ok {chk.ok}", style="dim")
    stats, tries = measure(paths, batch, args.warmup, args.repeats)
    rows = []
    orig = stats["orig"]
    for key, row in info.items():
        s = stats[key]
        lat_cut = 1.0 - s.median_ms / orig.median_ms
        row.update(model=name, orig_ms=orig.median_ms, orig_p10=orig.p10_ms, orig_p90=orig.p90_ms,
                   pruned_ms=s.median_ms, pruned_p10=s.p10_ms, pruned_p90=s.p90_ms,
                   latency_cut=lat_cut, cut_ratio=lat_cut / row["flops_cut"], measure_tries=tries)
        rows.append(row)
    return rows


def scp_kept(model, pruned) -> float:
    """One-shot accuracy proxy: the SCP keep score, Phi(beta / |gamma|) per BN channel (the
    probability it is active behind a rectifier), summed over the channels ``pruned`` keeps,
    over the original's sum. Kept channels are found by their BN weight values (randomised,
    so distinct), which works for any pruner that keeps module names (ours, Torch-Pruning)."""
    mods, tot, kept = dict(pruned.named_modules()), 0.0, 0.0
    for name, bn in model.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        w, b = bn.weight.detach(), bn.bias.detach()
        score = 0.5 * (1 + torch.erf(b / w.abs() / 2 ** 0.5))
        tot += float(score.sum())
        other = mods.get(name) or mods.get(name.replace(".", "_"))
        if other is None:
            return float("nan")
        kept += float(score[torch.isin(w, other.weight.detach())].sum())
    return kept / tot


def tp_prune(model, inputs, layer_ratio: float, round_to: int, f0: float):
    """Torch-Pruning's uniform L1 pruning of a copy at ``layer_ratio``: (model, FLOPs cut)."""
    import copy

    import torch_pruning as tp
    from softprune_fx.passes.flops import count_flops
    m = copy.deepcopy(model)
    ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    tp.pruner.MagnitudePruner(m, inputs[0], importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=layer_ratio, ignored_layers=ignored, round_to=round_to).step()
    return m.eval(), 1 - count_flops(m, inputs) / f0


def tp_at_latency(model, inputs, target_cut: float, round_to: int, threads, batch, steps: int = 4):
    """Torch-Pruning's uniform pruning, its layer ratio bisected until the measured latency
    cut (interleaved with the original, ``threads``, 15 repeats) is nearest ``target_cut``."""
    from softprune_fx.latency import measure_models
    from softprune_fx.passes.flops import count_flops
    f0 = count_flops(model, inputs)
    lo, hi, best = 0.0, 0.8, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        peer, fcut = tp_prune(model, inputs, mid, round_to, f0)
        st = measure_models({"orig": model, "peer": peer}, batch, threads, repeats=15)
        cut = 1 - st["peer"][0] / st["orig"][0]
        if best is None or abs(cut - target_cut) < abs(best[2] - target_cut):
            best = (peer, fcut, cut)
        lo, hi = (mid, hi) if cut < target_cut else (lo, mid)
    return best


def bench_target(name: str, args, threads: int) -> list[dict]:
    """One model at one ORT thread count: latency-mode prunes (+ FLOPs mode on the tables,
    + Torch-Pruning at the same measured cut), then all files timed in one interleaved run."""
    from softprune_fx.latency import measure_samples, paired_cut
    model, inputs = BIG[name]()
    randomize_norms(model, seed=0)
    model.eval()
    batch = torch.randn(args.batch, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(1))
    models, rows = {"orig": model}, []
    cache = args.latency_cache or tempfile.mkdtemp(prefix="latcache_")
    for ratio in args.ratios:
        start = time.perf_counter()
        pruned, res = softprune_fx.prune_one_shot(model, inputs, ratio, target="latency", ort_threads=threads,
                                                  latency_cache=cache)
        key = f"{ratio}/latency"
        models[key] = pruned
        rows.append(dict(key=key, ratio=ratio, mode="latency", flops_cut=res.flops_ratio,
                         params_kept=res.params_after / res.params_before, loop_cut=res.achieved_ratio,
                         pred_error=res.ort_pred_error, pred_cut=res.ort_pred_cut, rounds=res.latency_rounds,
                         pred_cut_tables=res.ort_pred_cut_tables, fixed_share=res.ort_pred_fixed_share,
                         seconds=time.perf_counter() - start))
        C.console.print(f"  {name} t{threads} {key}: measured {res.achieved_ratio:.3f} (pred {res.ort_pred_cut:.3f}, "
                        f"err {res.ort_pred_error:+.3f}), FLOPs {res.flops_ratio:.3f}, "
                        f"{time.perf_counter() - start:.0f} s", style="dim")
        if "auto-table" in args.roundings:
            pruned, res = softprune_fx.prune_one_shot(model, inputs, ratio, ort_threads=threads, latency_cache=cache)
            models[f"{ratio}/auto-table"] = pruned
            rows.append(dict(key=f"{ratio}/auto-table", ratio=ratio, mode="flops, auto from tables",
                             flops_cut=res.achieved_ratio, params_kept=res.params_after / res.params_before))
        if "auto" in args.roundings:
            pruned, res = softprune_fx.prune_one_shot(model, inputs, ratio)
            models[f"{ratio}/auto"] = pruned
            rows.append(dict(key=f"{ratio}/auto", ratio=ratio, mode="flops, auto (16/8)",
                             flops_cut=res.achieved_ratio, params_kept=res.params_after / res.params_before))
        for step in (args.torch_pruning if name in args.tp_models.split(",") and ratio in args.tp_ratios else []):
            cut = next(r["loop_cut"] for r in rows if r["key"] == key)
            peer, fcut, _ = tp_at_latency(model, inputs, cut, step, threads, batch)
            models[f"{ratio}/tp{step}"] = peer
            rows.append(dict(key=f"{ratio}/tp{step}", ratio=ratio, mode=f"torch-pruning {step}", flops_cut=fcut,
                             params_kept=sum(p.numel() for p in peer.parameters()) /
                             sum(p.numel() for p in model.parameters())))
    load = os.getloadavg()
    raw = measure_samples(models, batch, threads, warmup=args.warmup, repeats=args.repeats)
    stats = {n: [float(np.percentile(t, q)) for q in (50, 10, 90)] for n, t in raw.items()}
    o = stats["orig"]
    for r in rows:
        s = stats[r["key"]]
        r.update(model=name, threads=threads, orig_ms=o[0], pruned_ms=s[0], spread=[s[1], s[2]],
                 orig_spread=[o[1], o[2]], latency_cut=1 - s[0] / o[0],
                 paired_cut=paired_cut(raw[r["key"]], raw["orig"]), load_before=load[0],
                 load_after=os.getloadavg()[0])
        r["cut_over_flops"] = r["latency_cut"] / r["flops_cut"]
        if r["mode"] == "latency":
            r["within_3pt"] = abs(r["latency_cut"] - r["ratio"]) <= 0.03
            r["paired_within_3pt"] = abs(r["paired_cut"] - r["ratio"]) <= 0.03
            r["pred_error_rel"] = (1 - r["pred_cut"]) / (1 - r["paired_cut"]) - 1
            r["pred_error_rel_tables"] = (1 - r["pred_cut_tables"]) / (1 - r["paired_cut"]) - 1
        r["scp_kept"] = scp_kept(model, models[r["key"]])
    return rows


def main_target(args) -> None:
    rows = []
    for name in args.models.split(","):
        for threads in args.threads_list:
            rows += bench_target(name, args, threads)
            C.write_json("bench_latency_target" + (f"_{args.tag}" if args.tag else ""),  # each block, as it lands
                         {"batch": args.batch, "repeats": args.repeats, "rows": rows, "partial": True})
    C.console.print(C.table(
        f"--target latency: ORT CPU, batch {args.batch}, median (p10-p90) ms of {args.repeats}, interleaved; "
        f"paired cut = 1 - median of per-repeat ratios",
        ["model", "ORT thr", "ratio", "mode", "latency cut", "paired cut", "loop cut", "pred err (kept)",
         "tables' err", "FLOPs cut", "params kept", "SCP kept", "orig ms", "pruned ms", "lat/FLOPs", "load"],
        [[r["model"], r["threads"], r["ratio"], r["mode"], r["latency_cut"], r["paired_cut"], r.get("loop_cut", "-"),
          r.get("pred_error_rel", "-"), r.get("pred_error_rel_tables", "-"), r["flops_cut"], r["params_kept"],
          r["scp_kept"], f"{r['orig_ms']:.2f}",
          f"{r['pruned_ms']:.2f} ({r['spread'][0]:.1f}-{r['spread'][1]:.1f})", r["paired_cut"] / r["flops_cut"],
          f"{r['load_before']:.1f}-{r['load_after']:.1f}"] for r in rows]))
    C.write_json("bench_latency_target" + (f"_{args.tag}" if args.tag else ""),
                 {"batch": args.batch, "repeats": args.repeats, "rows": rows})


def bench_flops_default(args) -> None:
    """``--target flops-default``: ResNet-50 (``--models``) pruned with the defaults
    (``prune_one_shot(model, inputs, ratio)``, what ``softprune-fx prune model.py:build --ratio
    0.4`` runs) from a cold table cache (an empty ``$SOFTPRUNE_LATENCY_CACHE``: the fixed 16/8
    step), and from a warm one (tables for ORT's default threads built first: widths from
    their efficient points); then original, cold and warm timed interleaved ``--measurements``
    times for each of ``--threads-list``, alternating: paired latency cut / FLOPs cut."""
    from softprune_fx.api import analyze
    from softprune_fx.latency import LatencyCost, measure_samples, paired_cut
    out = []
    for name in args.models.split(","):
        model, inputs = BIG[name]()
        randomize_norms(model, seed=0)
        model.eval()
        batch = torch.randn(args.batch, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(1))
        models, flops = {"orig": model}, {}
        warm_dir = args.latency_cache or tempfile.mkdtemp(prefix="latwarm_")
        for kind, cache in (("cold", tempfile.mkdtemp(prefix="latcold_")), ("warm", warm_dir)):
            os.environ["SOFTPRUNE_LATENCY_CACHE"] = cache
            if kind == "warm":
                start = time.perf_counter()
                cg = analyze(model, inputs)
                LatencyCost(cg, cg.index, model, inputs, ort_threads=None, calibrate=False)  # ORT default threads
                C.console.print(f"  {name}: tables for ORT's default threads in {time.perf_counter() - start:.0f} s")
            pruned, res = softprune_fx.prune_one_shot(model, inputs, args.ratios[0])
            models[kind], flops[kind] = pruned, res.achieved_ratio
            C.console.print(f"  {name} {kind}: FLOPs cut {res.achieved_ratio:.3f}, SCP kept "
                            f"{scp_kept(model, pruned):.3f}", style="dim")
        os.environ.pop("SOFTPRUNE_LATENCY_CACHE")
        for m in range(args.measurements):
            for threads in args.threads_list:
                load = os.getloadavg()[0]
                raw = measure_samples(models, batch, threads, warmup=args.warmup, repeats=args.repeats)
                for kind in ("cold", "warm"):
                    cut = paired_cut(raw[kind], raw["orig"])
                    out.append(dict(model=name, threads=threads, measurement=m, cache=kind, flops_cut=flops[kind],
                                    paired_cut=cut, ratio_of_medians=1 - np.median(raw[kind]) / np.median(raw["orig"]),
                                    orig_ms=float(np.median(raw["orig"])), load=load, quotient=cut / flops[kind]))
                    C.console.print(f"  {name} t{threads} #{m} {kind}: latency cut {cut:.3f} / FLOPs "
                                    f"{flops[kind]:.3f} = {cut / flops[kind]:.3f} (load {load:.1f})")
    summary = []
    for key in sorted({(r["model"], r["threads"], r["cache"]) for r in out}):
        qs = [r["quotient"] for r in out if (r["model"], r["threads"], r["cache"]) == key]
        summary.append(dict(model=key[0], threads=key[1], cache=key[2], median_quotient=float(np.median(qs)),
                            quotients=qs, met=bool(np.median(qs) >= 0.97)))
        C.console.print(f"{key[0]} ORT threads {key[1]} {key[2]} cache: latency cut / FLOPs cut median "
                        f"{np.median(qs):.3f} of {len(qs)} ({', '.join(f'{q:.2f}' for q in qs)}): "
                        f"{'met' if np.median(qs) >= 0.97 else 'MISSED'} (>= 0.97)")
    C.write_json("bench_latency_flops_default" + (f"_{args.tag}" if args.tag else ""),
                 {"ratio": args.ratios[0], "repeats": args.repeats, "rows": out, "summary": summary})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenetv2_full")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--roundings", nargs="+", default=["auto", "none"], help="auto, none or a step, e.g. 32")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--ort-threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--torch-pruning", type=int, nargs="*", default=[], metavar="ROUND_TO",
                    help="also time Torch-Pruning's uniform pruning with these round_to steps")
    ap.add_argument("--target", choices=["flops", "latency", "flops-default", "keep-sets"], default="flops",
                    help="flops-default: the FLOPs-mode defaults, cold and warm table cache (--ratios 0.4)")
    ap.add_argument("--measurements", type=int, default=3, help="--target flops-default: interleaved runs")
    ap.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], help="--target latency: ORT threads")
    ap.add_argument("--tp-models", default="resnet50", help="--target latency: models Torch-Pruning runs on")
    ap.add_argument("--tp-ratios", type=float, nargs="+", default=[0.4], help="--target latency: its ratios")
    ap.add_argument("--latency-cache", default=None, help="--target latency: table cache (default: a fresh one)")
    ap.add_argument("--keep-latency-ratio", type=float, default=0.39,
                    help="--target keep-sets: the latency-mode decision's latency cut")
    args = ap.parse_args()
    if args.target == "keep-sets":
        from bench_latency_sets import bench_keep_sets
        return bench_keep_sets(args)
    if args.target == "flops-default":
        return bench_flops_default(args)
    if args.target == "latency":
        args.roundings = [r for r in args.roundings if r in ("auto", "auto-table")]
        return main_target(args)
    if args.ort_threads:
        pin_ort_threads(args.ort_threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args, Path(tmp))
    table_rows = [[r["model"], r["ratio"], r["rounding"], r["flops_cut"], r["params_after"] / r["params_before"],
                   f"{r['orig_ms']:.2f} ({r['orig_p10']:.1f}-{r['orig_p90']:.1f})",
                   f"{r['pruned_ms']:.2f} ({r['pruned_p10']:.1f}-{r['pruned_p90']:.1f})",
                   r["latency_cut"], r["cut_ratio"], "yes" if r["onnx_ok"] else "NO"] for r in rows]
    C.console.print(C.table(
        f"ONNX Runtime CPU latency, batch {args.batch}, ORT threads {args.ort_threads or 'default'}, "
        f"median (p10-p90) ms of {args.repeats}, interleaved",
        ["model", "ratio", "round_to", "FLOPs cut", "params kept", "orig ms", "pruned ms", "latency cut",
         "lat cut / FLOPs cut", "ORT == torch"], table_rows))
    target = next((r for r in rows if r["model"] == "resnet50" and r["ratio"] == 0.4 and r["rounding"] == "auto"),
                  None)
    verdict = None
    if target is not None:
        verdict = target["cut_ratio"] >= TARGET
        C.console.print(f"issue 4 target (resnet50, 0.4, defaults): latency cut / FLOPs cut = "
                        f"{target['cut_ratio']:.3f} {'>=' if verdict else '<'} {TARGET}: "
                        f"{'met' if verdict else 'MISSED'}")
    C.write_json("bench_latency" + (f"_{args.tag}" if args.tag else ""),
                 {"batch": args.batch, "ort_threads": args.ort_threads or "default", "repeats": args.repeats,
                  "warmup": args.warmup, "rows": rows, "target": TARGET, "target_met": verdict})


if __name__ == "__main__":
    main()
