"""torchvision's classification models: analysis speed, coverage, invariant, largest cut.

Needs a separate environment with torchvision (torch 2.14.1 + torchvision 0.29.1, ~5.5 GB)::

    python -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/pip install numpy networkx onnx onnxruntime onnxscript tabulate rich pydot
    /tmp/tvenv/bin/pip install --no-deps torch-pruning
    /tmp/tvenv/bin/pip install --no-deps -e .
    /tmp/tvenv/bin/python benchmarks/bench_torchvision.py            # all models, one process
    # or split over two processes and merge:
    /tmp/tvenv/bin/python benchmarks/bench_torchvision.py --models resnet18 ... --tag part1
    /tmp/tvenv/bin/python benchmarks/bench_torchvision.py --merge part1 part2

Every model is built with ``weights=None`` (googlenet / inception_v3 with ``aux_logits=False``),
put in eval mode, and every BatchNorm / LayerNorm / GroupNorm affine parameter and BN running
statistic is randomised with seed 0 (weight ~ U(0.5, 1.5), bias ~ N(0, 0.2), running_mean ~
N(0, 0.2), running_var ~ U(0.5, 1.5)). One torch thread.

* timing: ``softprune_fx.analyze(model, (x,))`` vs Torch-Pruning's
  ``tp.DependencyGraph().build_dependency(model, example_inputs=x)`` at 224 px (299 for
  inception_v3), batch 1, float32; one warm-up each, then 5 interleaved repeats; medians and
  the median of the per-repeat ratios.
* coverage / invariant: groups / prunable groups and the distinct frozen reasons; then in
  float64 (``model.double()``, a small input: 64 px unless the model needs more) two random legal
  drops (``tests/drops.py: random_drop``, seeds 0 and 1): ``prune_channels(m, x, drop)(x)``
  must equal ``masked(m, x, drop)(x)`` within ``1e-12 * max(1, max|ref|)``.
* largest reachable cut: ``prune_one_shot(model, (x,), 0.999, round_to=None)`` (float32, the
  timing input, or ``--cut-px``) raises ``BudgetError`` naming the largest reachable FLOPs cut
  (60 s alarm). When it returns instead, the cut reached 0.999 within ``decide``'s tolerance
  (0.01): the table shows ">=98.9%".

Any exception is recorded per model (type, one line, full traceback in the JSON).
Writes ``benchmarks/results/bench_torchvision[_TAG].json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import time
import traceback
import warnings

import _common as C
import torch
import torchvision

import softprune_fx as sp
from drops import random_drop  # tests/drops.py, on sys.path through _common
from softprune_fx.passes.errors import BudgetError

TOL64 = 1e-12
REPEATS = 5
CUT_LIMIT_S = 60

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
          "mobilenet_v3_large", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0",
          "squeezenet1_1", "mnasnet1_0", "regnet_y_400mf", "googlenet", "inception_v3",
          "convnext_tiny", "vgg11_bn", "vit_b_16"]
TIMING_PX = {"inception_v3": 299}
SMALL_PX = {"inception_v3": 96, "vit_b_16": 224}  # inception_v3 needs >= 75 px; vit_b_16 exactly 224


def build(name: str) -> torch.nn.Module:
    kwargs = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    g = torch.Generator().manual_seed(0)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, norms):
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in tensors(o)]
    return []


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def err(row: dict, part: str, exc: BaseException) -> None:
    row.setdefault("errors", {})[part] = one_line(exc)
    row.setdefault("tracebacks", {})[part] = traceback.format_exc()


def part_timing(model, x, row: dict) -> None:
    import torch_pruning as tp
    sp_t, tp_t, ratios = [], [], []
    sp_ok = tp_ok = True
    try:
        sp.analyze(model, (x,))
    except Exception as exc:  # noqa: BLE001
        err(row, "analyze_224", exc)
        sp_ok = False
    try:
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    except Exception as exc:  # noqa: BLE001
        err(row, "tp_build", exc)
        tp_ok = False
    for _ in range(REPEATS):
        a = b = None
        if sp_ok:
            a, _ = C.timed(sp.analyze, model, (x,))
            sp_t.append(a)
        if tp_ok:
            b, _ = C.timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))
            tp_t.append(b)
        if a is not None and b is not None:
            ratios.append(a / b)
    row["sp_ms"] = 1e3 * C.med(sp_t) if sp_t else None
    row["tp_ms"] = 1e3 * C.med(tp_t) if tp_t else None
    row["ratio"] = C.med(ratios) if ratios else None
    row["sp_ms_all"] = [1e3 * t for t in sp_t]
    row["tp_ms_all"] = [1e3 * t for t in tp_t]


def part_invariant(model, name: str, row: dict) -> None:
    px = SMALL_PX.get(name, 64)
    row["invariant_px"] = px
    m64 = copy.deepcopy(model).double()
    x64 = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    try:
        cg = sp.analyze(m64, (x64,))
    except Exception as exc:  # noqa: BLE001
        err(row, "analyze", exc)
        return
    row["groups"] = len(cg.groups)
    row["prunable_groups"] = sum(bool(g.prunable) for g in cg.groups)
    row["prunable_channels"] = sum(g.width for g in cg.groups if g.prunable)
    reasons: dict = {}
    for g in cg.groups:
        if not g.prunable:
            r = " ".join(str(g.frozen_reason).split())
            reasons[r] = reasons.get(r, 0) + 1
    row["frozen_reasons"] = reasons
    errs, dropped = [], 0
    for seed in (0, 1):
        try:
            drop = random_drop(cg, seed)
            dropped += sum(len(v) for v in drop.values())
            with torch.no_grad():
                ref = tensors(sp.masked(m64, (x64,), drop)(x64))
                got = tensors(sp.prune_channels(m64, (x64,), drop)(x64))
            if [r.shape for r in ref] != [g.shape for g in got]:
                raise AssertionError(f"output shapes differ: {[r.shape for r in ref]} vs {[g.shape for g in got]}")
            errs.append(max(((a - b).abs().max() / max(1.0, a.abs().max().item())).item()
                            for a, b in zip(ref, got)))
        except Exception as exc:  # noqa: BLE001
            err(row, f"invariant_seed{seed}", exc)
            errs.append(float("inf"))
    row["rel_err"] = max(errs)
    row["dropped"] = dropped
    row["exact"] = row["rel_err"] <= TOL64 and dropped > 0


class CutTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CutTimeout(f"prune_one_shot took more than {CUT_LIMIT_S} s")


def part_cut(model, x, row: dict) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CUT_LIMIT_S)
    start = time.perf_counter()
    try:
        _, res = sp.prune_one_shot(model, (x,), 0.999, round_to=None)
        row["max_cut"] = res.achieved_ratio
        row["max_cut_source"] = "reached"  # within decide()'s tol (0.01) of 0.999: the cut is >= 98.9%
    except BudgetError as exc:
        m = re.search(r"largest reachable cut is ([\d.]+)%", str(exc))
        row["max_cut"] = float(m.group(1)) / 100 if m else None
        row["max_cut_source"] = "budget_error"
        if m is None:
            row["max_cut_msg"] = str(exc)
    except CutTimeout as exc:
        row["max_cut"] = None
        row["max_cut_skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        row["max_cut"] = None
        err(row, "prune_one_shot", exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    row["max_cut_s"] = time.perf_counter() - start


def run_model(name: str, parts: list[str], cut_px: int | None = None) -> dict:
    row: dict = {}
    start = time.perf_counter()
    try:
        model = build(name)
        px = TIMING_PX.get(name, 224)
        x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
        row["timing_px"] = px
        row["params"] = sum(p.numel() for p in model.parameters())
        if "timing" in parts:
            part_timing(model, x, row)
        if "invariant" in parts:
            part_invariant(model, name, row)
        if "cut" in parts:
            if cut_px:
                row["cut_px"] = cut_px
                x = torch.randn(1, 3, cut_px, cut_px, generator=torch.Generator().manual_seed(0))
            part_cut(model, x, row)
    except Exception as exc:  # noqa: BLE001
        err(row, "build", exc)
    row["seconds"] = time.perf_counter() - start
    return row


def render(out: dict) -> list[list]:
    rows = []
    for name, r in out.items():
        inv = ("exact" if r.get("exact") else
               ("FAIL" if "rel_err" in r or r.get("errors") else "-"))
        cut = r.get("max_cut")
        reached = r.get("max_cut_source", "reached" if cut is not None and cut >= 0.9889 else "") == "reached"
        short: dict = {}
        for k, v in (r.get("frozen_reasons") or {}).items():
            k = re.sub(r" at node \S+", "", k).replace("torchvision.ops.stochastic_depth.", "")
            short[k] = short.get(k, 0) + v
        reasons = "; ".join(f"{k} (x{v})" for k, v in short.items())
        errors = "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items())
        rows.append([name, "-" if r.get("sp_ms") is None else round(r["sp_ms"], 1),
                     "-" if r.get("tp_ms") is None else round(r["tp_ms"], 1),
                     "-" if r.get("ratio") is None else round(r["ratio"], 2),
                     f"{r.get('prunable_groups', '-')}/{r.get('groups', '-')}", inv,
                     "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}",
                     "-" if cut is None else (">=" if reached else "") + f"{cut:.1%}"
                     + (f" @{r['cut_px']} px" if r.get("cut_px") else "")
                     + ("" if "max_cut_s" not in r else f" ({r['max_cut_s']:.0f} s)"),
                     reasons or "-", errors or ("" if cut is not None else r.get("max_cut_skipped", ""))])
    return rows


COLUMNS = ["model", "analyze ms", "TP build ms", "analyze / TP", "prunable/groups", "invariant (f64)",
           "max rel err", "largest cut", "frozen reasons", "errors"]


def summarise(out: dict) -> dict:
    return {"models": len(out), "exact": sum(bool(r.get("exact")) for r in out.values()),
            "with_errors": sorted(n for n, r in out.items() if r.get("errors")),
            "ratio_median": C.med([r["ratio"] for r in out.values() if r.get("ratio")] or [0.0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--parts", nargs="*", default=["timing", "invariant", "cut"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--cut-px", type=int, default=None,
                    help="input size for the largest-cut part (default: the timing input)")
    ap.add_argument("--merge", nargs="*", help="merge bench_torchvision_<TAG>.json files into bench_torchvision.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.merge:
        out, machines = {}, []
        for tag in args.merge:
            d = json.loads((C.RESULTS / f"bench_torchvision_{tag}.json").read_text())
            machines.append(d["machine"])
            for n, r in d["models"].items():
                out.setdefault(n, {}).update(r)
        out = {n: out[n] for n in MODELS if n in out} | {n: r for n, r in out.items() if n not in MODELS}
        C.console.print(C.table("torchvision models", COLUMNS, render(out)))
        C.write_json("bench_torchvision", {"summary": summarise(out), "parts_machines": machines, "models": out})
        return
    out = {}
    for name in args.models:
        out[name] = run_model(name, args.parts, args.cut_px)
        r = out[name]
        C.console.print(f"[bold]{name}[/]: {r['seconds']:.1f} s; " + json.dumps(
            {k: v for k, v in r.items() if k not in ("tracebacks", "sp_ms_all", "tp_ms_all")}, default=str))
        for part, tb in (r.get("tracebacks") or {}).items():
            C.console.print(f"--- traceback {name} {part}\n{tb}", markup=False, highlight=False)
    C.console.print(C.table("torchvision models", COLUMNS, render(out)))
    C.write_json("bench_torchvision" + (f"_{args.tag}" if args.tag else ""),
                 {"summary": summarise(out), "parts": args.parts, "models": out})


if __name__ == "__main__":
    main()
