"""Accuracy at a budget on the digits data set: SCP vs classic criteria, three seeds.

Command (about 15 minutes, one torch thread; needs scikit-learn for the data)::

    python benchmarks/bench_accuracy.py            # --seeds 0 1 2 --epochs 30 --finetune 10

The network is ``examples/digits.py``'s ResNet-14 (16x16 digits, 1437 train / 360 val).
Every method gets the same total number of epochs (E + F) from the same initial weights
per seed, SGD (Nesterov, momentum 0.9, weight decay 1e-4, cosine) via
``softprune_fx.train``:

* unpruned: ``train_plain`` for E + F epochs (lr 0.1).
* SCP: ``train_scp(ratio=0.4, epochs=E, finetune_epochs=F)`` (fine-tune lr 0.01).
* L1-norm filters (Li et al. 2017): ``train_plain`` E epochs, then each prunable group
  keeps its channels with the largest L1 norm of the producing conv filters (summed over
  the group's producers), the same fraction in every group (the fraction bisected to the
  budget), then fine-tuned F epochs (lr 0.01).
* network slimming (Liu et al. 2017): E epochs with the subgradient ``lambda * sign(gamma)``
  added to every BN scale's gradient (lambda 1e-3: the paper's 1e-4 is for ~60k steps,
  here ~700), then one global threshold on |gamma| (a group's channel scores the max over
  its BNs), then fine-tuned F epochs.
* random: the unpruned E-epoch model, random scores, the same fraction in every group.

All pruned models go through the same decision (``decide`` from the criterion's keep set
to the 40% FLOPs cut within 1 point, default rounding) and the same surgery
(``prune_channels``), so only the criterion differs. "acc right after pruning" is the
pruned model before fine-tuning (for SCP: the hard-masked model at the end of the SCP
epochs, which the pruned model equals). Writes
``benchmarks/results/bench_accuracy.json``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import _common as C
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(C.ROOT / "examples"))
import digits  # noqa: E402

import softprune_fx  # noqa: E402
from softprune_fx.passes.atoms import along  # noqa: E402
from softprune_fx.cost import CostModel  # noqa: E402
from softprune_fx.index import ChannelIndex  # noqa: E402
from softprune_fx.pruner import _finish  # noqa: E402
from softprune_fx.train import evaluate, train_plain, train_scp  # noqa: E402

RATIO = 0.4
OPTIONS = dict(frozen=(), leaf_modules=(), allow_inexact=False)


def channel_values(cg, index: ChannelIndex, kind: str) -> np.ndarray:
    """Per flat channel: sum of producer-filter L1 norms ("l1") or max |BN gamma| ("gamma")."""
    vals = np.zeros(index.size)
    modules = dict(cg.gm.named_modules())
    for node in cg.gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if kind == "l1" and isinstance(m, nn.Conv2d) and m.groups == 1:
            v = m.weight.detach().abs().sum((1, 2, 3)).double().numpy()
        elif kind == "gamma" and isinstance(m, nn.BatchNorm2d):
            v = m.weight.detach().abs().double().numpy()
        else:
            continue
        lay = cg.flow.layouts.get(node)
        vec = along(lay, 1, len(v)) if isinstance(lay, np.ndarray) else None
        if vec is None:
            continue
        ids = index.atom_ids(vec)
        ok = ids >= 0
        (np.add if kind == "l1" else np.maximum).at(vals, ids[ok], v[ok])
    return vals


def uniform_keep(cg, index, scores, frac: float) -> np.ndarray:
    """Each prunable group keeps its best ceil((1 - frac) * free) free channels."""
    keep = np.ones(index.size, dtype=bool)
    for g in cg.groups:
        ids = index.ids(g.id)
        free = ids[~index.frozen[ids]]
        if not g.prunable or len(free) == 0:
            continue
        n_keep = max(1, int(np.ceil((1 - frac) * len(free))))
        keep[free[np.argsort(-scores[free], kind="stable")[n_keep:]]] = False
    return keep


def threshold_keep(cg, index, scores, t: float) -> np.ndarray:
    """One global threshold; every group keeps at least its best channel."""
    keep = (scores >= t) | index.frozen
    for g in cg.groups:
        ids = index.ids(g.id)
        if g.prunable and not keep[ids].any():
            keep[ids[np.argmax(scores[ids])]] = True
    return keep


def bisect_keep(make, cost, lo: float, hi: float) -> np.ndarray:
    """The keep set of ``make(x)`` whose FLOPs cut is nearest RATIO (x increasing cuts)."""
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        keep = make(mid)
        cut = cost.ratio(keep)
        if best is None or abs(cut - RATIO) < abs(best[0] - RATIO):
            best = (cut, keep)
        lo, hi = (mid, hi) if cut < RATIO else (lo, mid)
    return best[1]


def prune_by(model, inputs, criterion: str, seed: int):
    """Prune ``model`` to RATIO with ``criterion`` through softprune-fx's decision and surgery."""
    model.eval()
    cg = softprune_fx.analyze(model, inputs)
    index = ChannelIndex(cg)
    cost = CostModel(cg, index, model, inputs)
    if criterion == "slimming":
        scores = channel_values(cg, index, "gamma")
        free = scores[~index.frozen]
        keep0 = bisect_keep(lambda t: threshold_keep(cg, index, scores, t), cost, 0.0, float(free.max()) + 1e-9)
    else:
        if criterion == "l1":
            raw = channel_values(cg, index, "l1")
            scores = raw.copy()
            for g in cg.groups:
                ids = index.ids(g.id)
                scores[ids] = raw[ids] / max(raw[ids].mean(), 1e-12)
        else:
            scores = np.random.default_rng(seed).random(index.size)
        keep0 = bisect_keep(lambda f: uniform_keep(cg, index, scores, f), cost, 0.0, 1.0)
    scores = np.where(index.frozen, np.inf, scores)
    return _finish(cg, model, inputs, index, cost, scores, keep0 | index.frozen, RATIO, min_width=1,
                   round_to="auto", options=OPTIONS, how=criterion)


def slimming_train(model, train, val, epochs: int, seed: int, lam: float):
    handles = [m.weight.register_hook(lambda g, w=m.weight: g + lam * torch.sign(w.detach()))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        return train_plain(model, train, val, epochs, seed=seed, progress=False)[0]
    finally:
        for h in handles:
            h.remove()


def run_seed(seed: int, args) -> dict:
    train, val = digits.loaders()
    x = digits.example_inputs()
    torch.manual_seed(seed)
    init = digits.build()
    E, F = args.epochs, args.finetune
    out = {}
    t = time.perf_counter()
    _, info = train_plain(copy.deepcopy(init), train, val, E + F, seed=seed, progress=False)
    out["unpruned"] = {"acc": info["accuracy"], "cut": 0.0, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    _, res, info = train_scp(copy.deepcopy(init), x, train, val, ratio=RATIO, epochs=E, finetune_epochs=F,
                             seed=seed, progress=False)
    out["scp"] = {"acc": info["accuracy_pruned"], "acc_before_ft": info["accuracy_masked"],
                  "cut": res.achieved_ratio, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    pre, _ = train_plain(copy.deepcopy(init), train, val, E, seed=seed, progress=False)
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    slim = slimming_train(copy.deepcopy(init), train, val, E, seed, args.slim_lambda)
    t_slim = time.perf_counter() - t
    for name, base, crit, t0 in (("l1", pre, "l1", t_pre), ("slimming", slim, "slimming", t_slim),
                                 ("random", pre, "random", t_pre)):
        t = time.perf_counter()
        pruned, res = prune_by(copy.deepcopy(base), x, crit, seed)
        before = evaluate(pruned, val)
        train_plain(pruned, train, val, F, lr=0.01, seed=seed + 1000003, progress=False)
        out[name] = {"acc": evaluate(pruned, val), "acc_before_ft": before, "cut": res.achieved_ratio,
                     "seconds": t0 + time.perf_counter() - t}
    C.console.print(f"  seed {seed}: " + ", ".join(f"{k} {v['acc']:.4f}" for k, v in out.items()), style="dim")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="E: training (with masks / slimming) epochs")
    ap.add_argument("--finetune", type=int, default=10, help="F: fine-tune epochs after pruning")
    ap.add_argument("--slim-lambda", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="1: 2 threads on a busy 2-core machine ran 90x slower")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = {s: run_seed(s, args) for s in args.seeds}
    methods = {"unpruned": "(a) unpruned", "scp": "SCP (softprune-fx)", "l1": "(b) L1-norm filters",
               "slimming": "(c) network slimming", "random": "(d) random channels"}
    rows, summary = [], {}
    for key, label in methods.items():
        accs = np.array([per_seed[s][key]["acc"] for s in args.seeds])
        cuts = np.array([per_seed[s][key]["cut"] for s in args.seeds])
        pre = [per_seed[s][key].get("acc_before_ft") for s in args.seeds]
        summary[key] = {"acc_mean": float(accs.mean()), "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                        "acc_min": float(accs.min()), "acc_max": float(accs.max()), "cut_mean": float(cuts.mean())}
        rows.append([label, f"{100 * accs.mean():.2f} ± {100 * summary[key]['acc_std']:.2f}",
                     " ".join(f"{100 * a:.1f}" for a in accs), f"{cuts.mean():.1%}",
                     "-" if pre[0] is None else f"{100 * np.mean(pre):.2f}"])
    C.console.print(C.table(
        f"digits ResNet-14 at a {RATIO:.0%} FLOPs cut, {args.epochs}+{args.finetune} epochs, seeds {args.seeds}",
        ["method", "val acc % (mean ± sd)", "per seed", "FLOPs cut", "acc right after pruning"], rows))
    C.console.print(f"total {time.perf_counter() - start:.0f} s")
    C.write_json("bench_accuracy", {"epochs": args.epochs, "finetune": args.finetune, "ratio": RATIO,
                                    "slim_lambda": args.slim_lambda, "seeds": args.seeds,
                                    "summary": summary, "per_seed": per_seed})


if __name__ == "__main__":
    main()
