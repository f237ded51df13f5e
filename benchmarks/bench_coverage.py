"""Coverage: which zoo models softprune-fx prunes exactly, next to Torch-Pruning.

Command (about 3 minutes on 2 cores)::

    pip install torch-pruning --no-deps      # once
    python benchmarks/bench_coverage.py

For every model in ``tests/zoo.py: ZOO`` (eval mode, its own example inputs):

* softprune-fx: ``analyze`` + ``prune_channels`` in float64 with two random legal drops
  (``tests/conftest.py: random_drop``, seeds 0 and 1); "exact" when the pruned model's
  outputs equal the hard-masked model's within ``1e-12 * max(1, max|ref|)`` (DESIGN.md
  section 2) and the drops removed at least one channel.
* prunable FLOPs share: the largest FLOPs cut ``prune_one_shot`` reaches with
  ``round_to=None, min_width=1`` (asked for 99.9%, it raises ``BudgetError`` naming the
  largest reachable cut; the decision keeps every legal constraint, e.g. group counts).
* Torch-Pruning 1.6: ``tp.pruner.MagnitudePruner`` (L1 magnitude importance), local
  pruning first and global pruning if local fails, ``ignored_layers`` = the conv/linear
  modules whose output is a model output (matched by storage, as a user would list the
  heads); ``pruning_ratio`` bisected (8 steps on [0, 0.9]) to a FLOPs cut of 0.40 (counted
  with FlopCounterMode, as ours); "ok" when ``pruner.step()`` and a forward run and the
  output shapes are unchanged; otherwise the first error.

Writes ``benchmarks/results/bench_coverage.json``.
"""
from __future__ import annotations

import copy
import re
import time
import warnings

import _common as C
import torch
import torch_pruning as tp
from conftest import outputs, random_drop, rel_err
from zoo import ZOO

import softprune_fx as sp
from softprune_fx.passes.errors import BudgetError
from softprune_fx.passes.flops import count_flops
from softprune_fx.onnx_check import flatten_outputs

TOL64 = 1e-12
TP_TARGET = 0.40


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:140]}"


def softprune_row(model, inputs) -> dict:
    row: dict = {}
    m64 = copy.deepcopy(model).double()
    x64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    try:
        cg = sp.analyze(m64, x64)
        row["groups"] = len(cg.groups)
        row["prunable_groups"] = sum(g.prunable for g in cg.groups)
        errs, dropped = [], 0
        for seed in (0, 1):
            drop = random_drop(cg, seed)
            dropped += sum(len(v) for v in drop.values())
            ref = outputs(sp.masked(m64, x64, drop), x64)
            got = outputs(sp.prune_channels(m64, x64, drop), x64)
            errs.append(rel_err(ref, got) if [r.shape for r in ref] == [g.shape for g in got] else float("inf"))
        row["rel_err"] = max(errs)
        row["dropped"] = dropped
        row["exact"] = row["rel_err"] <= TOL64 and dropped > 0
    except Exception as exc:  # noqa: BLE001 - reported per model
        row.update(exact=False, error=one_line(exc))
        return row
    try:
        _, res = sp.prune_one_shot(model, inputs, 0.999, round_to=None, min_width=1)
        row["max_cut"] = res.achieved_ratio
    except BudgetError as exc:
        m = re.search(r"largest reachable cut is ([\d.]+)%", str(exc))
        row["max_cut"] = float(m.group(1)) / 100 if m else None
    except Exception as exc:  # noqa: BLE001
        row["max_cut"], row["max_cut_error"] = None, one_line(exc)
    return row


def output_heads(model, inputs) -> list:
    """Conv/linear modules whose output (or a view of it) is a model output."""
    found, hooks = {}, []

    def record(mod, args, out) -> None:
        if isinstance(out, torch.Tensor):
            found[out.data_ptr()] = mod  # the last writer: freed memory gets reused
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(record))
    try:
        with torch.no_grad():
            outs = flatten_outputs(model(*inputs))
    finally:
        for h in hooks:
            h.remove()
    return list({id(found[t.data_ptr()]): found[t.data_ptr()] for _, t in outs if t.data_ptr() in found}.values())


def tp_prune(model, inputs, ratio: float, global_pruning: bool):
    m = copy.deepcopy(model).eval()
    heads = output_heads(m, inputs)
    pruner = tp.pruner.MagnitudePruner(m, example_inputs=inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=heads)
    pruner.step()
    return m


def tp_row(model, inputs, f0: int) -> dict:
    ref_shapes = [t.shape for t in outputs(model, inputs)]
    errors = []
    for global_pruning in (False, True):
        try:
            lo, hi, best = 0.0, 0.9, None
            for _ in range(8):
                mid = (lo + hi) / 2
                pruned = tp_prune(model, inputs, mid, global_pruning)
                shapes = [t.shape for t in outputs(pruned, inputs)]
                if shapes != ref_shapes:
                    raise RuntimeError(f"output shapes changed: {ref_shapes} -> {shapes}")
                cut = 1.0 - count_flops(pruned, inputs) / f0
                if best is None or abs(cut - TP_TARGET) < abs(best[1] - TP_TARGET):
                    best = (mid, cut)
                lo, hi = (mid, hi) if cut < TP_TARGET else (lo, mid)
            return {"tp_ok": True, "tp_global": global_pruning, "tp_ratio": best[0], "tp_cut": best[1]}
        except Exception as exc:  # noqa: BLE001 - reported per model
            errors.append(("global: " if global_pruning else "local: ") + one_line(exc))
    return {"tp_ok": False, "tp_error": errors[-1], "tp_errors": errors}


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, out = [], {}
    for name in sorted(ZOO):
        start = time.perf_counter()
        model, inputs = ZOO[name]()
        row = softprune_row(model, inputs)
        try:
            row.update(tp_row(model, inputs, count_flops(model, inputs)))
        except Exception as exc:  # noqa: BLE001 - e.g. the original does not count
            row.update(tp_ok=False, tp_error=one_line(exc))
        row["seconds"] = time.perf_counter() - start
        out[name] = row
        sp_cell = "exact" if row.get("exact") else ("FAIL: " + row.get("error", f"rel {row.get('rel_err')}"))
        cut = row.get("max_cut")
        tp_cell = (f"ok ({'global' if row['tp_global'] else 'local'}, ratio {row['tp_ratio']:.2f})"
                   if row.get("tp_ok") else "FAIL: " + str(row.get("tp_error")))
        rows.append([name, f"{row.get('prunable_groups', '-')}/{row.get('groups', '-')}", sp_cell,
                     row.get("rel_err", "-"), "-" if cut is None else f"{cut:.1%}",
                     tp_cell, "-" if not row.get("tp_ok") else f"{row['tp_cut']:.1%}"])
    C.console.print(C.table("Coverage over the zoo (softprune-fx float64 invariant; Torch-Pruning at ~40% FLOPs cut)",
                            ["model", "prunable groups", "softprune-fx", "rel err (f64)", "max FLOPs cut",
                             "Torch-Pruning", "TP FLOPs cut"], rows))
    n = len(out)
    summary = {"models": n, "softprune_exact": sum(bool(r.get("exact")) for r in out.values()),
               "tp_ok": sum(bool(r.get("tp_ok")) for r in out.values())}
    C.console.print(f"softprune-fx exact on {summary['softprune_exact']}/{n}; "
                    f"Torch-Pruning ran on {summary['tp_ok']}/{n}")
    C.write_json("bench_coverage", {"summary": summary, "models": out})


if __name__ == "__main__":
    main()
