"""SCP beyond rectifiers: does joint training land on the budget behind SiLU, GELU and in a
BN-free net, with a plain user loop that tells the pruner nothing but its forwards?

Command (about 12 minutes on 2 cores, one torch thread per run)::

    python benchmarks/bench_activations.py          # --epochs 30 --ratio 0.4 --nets relu,silu,gelu,convnext

Nets: examples/digits.py's ResNet-14 with ReLU, with SiLU and with GELU everywhere, and
examples/digits_convnext.py (depthwise 7x7, LayerNorm, Linear-GELU-Linear; no BN). Each is
trained twice from the same initial weights for the same epochs with the same loop (SGD,
momentum 0.9, lr 0.1, per-step cosine, weight decay 1e-4, batch 64): once plain, once as
``SoftPruner(model, x, ratio).model`` with ``+ pruner.regularization()`` in the loss and
the defaults (no ``total_steps``), then ``finalize()``. Reported: the hard-rule cut at the
end of training, the final cut, accuracy pruned vs unpruned, and the gap. Done-when of
issue 10: hard cut in [0.39, 0.43], final cut within 1 point, accuracy within 1.5 points.
Writes ``benchmarks/results/bench_activations.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings

import _common as C
import torch
import torch.nn.functional as F

sys.path.insert(0, str(C.ROOT / "examples"))
import digits  # noqa: E402
import digits_convnext  # noqa: E402

import softprune_fx as sp  # noqa: E402

NETS = {"relu": lambda: digits.build(act="relu"), "silu": lambda: digits.build(act="silu"),
        "gelu": lambda: digits.build(act="gelu"), "convnext": digits_convnext.build}


def fit(net, params, train, epochs: int, reg=None, log=None) -> None:
    """The user's loop: SGD + cosine, cross-entropy (+ the pruner's regulariser)."""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train))
    net.train()
    for epoch in range(epochs):
        for x, y in train:
            loss = F.cross_entropy(net(x), y)
            if reg is not None:
                loss = loss + reg()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log is not None:
            log(epoch)


def run(name: str, epochs: int, ratio: float, seed: int, options: dict, known_plain: dict) -> dict:
    train, val = digits.loaders()
    torch.manual_seed(seed)
    init = NETS[name]()
    t0 = time.perf_counter()
    if name in known_plain:  # the same seeded, one-thread training: the same figure
        acc_plain = known_plain[name]
    else:
        plain = copy.deepcopy(init)
        fit(plain, digits.param_groups(plain), train, epochs)
        acc_plain = digits.evaluate(plain, val)
    t1 = time.perf_counter()
    pruner = sp.SoftPruner(copy.deepcopy(init), digits.example_inputs(), ratio, **options)
    trace = []

    def log(epoch):
        p = pruner.progress()
        trace.append((round(p["hard_flops_ratio"], 4), round(p["lambda"], 5)))
    fit(pruner.model, pruner.param_groups(1e-4), train, epochs, pruner.regularization, log)
    acc_masked = digits.evaluate(pruner.model, val)
    alive = pruner.progress()["alive"]  # the hard rule's widths when training ends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, result = pruner.finalize()
    final = {gid: w[1] for gid, w in result.widths.items() if gid in alive}
    row = {"net": name, "hard_cut_end": trace[-1][0], "final_cut": result.achieved_ratio,
           "acc_pruned": digits.evaluate(pruned, val), "acc_masked": acc_masked, "acc_plain": acc_plain,
           "gates": int(pruner.bank.gates().sum()), "sites": len(pruner.bank.sites),
           "thresholds": sorted({t for ts in result.thresholds.values() for t in ts}),
           "trace": trace, "max_abs_diff": result.max_abs_diff,
           # finalize vs the hard rule: channels it removed that training kept, and the reverse
           "extra_cut": sum(max(0, alive[g] - final[g]) for g in final),
           "extra_kept": sum(max(0, final[g] - alive[g]) for g in final),
           "widths": {g: [result.widths[g][0], alive[g], final[g]] for g in final if result.widths[g][0] != final[g]
                      or alive[g] != final[g]},
           "plain_s": t1 - t0, "scp_s": time.perf_counter() - t1}
    row["acc_gap_pts"] = 100 * (row["acc_pruned"] - row["acc_plain"])
    row["ok"] = (0.39 <= row["hard_cut_end"] <= 0.43 and abs(row["final_cut"] - ratio) <= 0.01
                 and row["acc_gap_pts"] >= -1.5)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--options", default="{}", help="SoftPruner keyword arguments as JSON (experiments)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--plain-from", nargs="*", default=[],
                    help="result files of earlier runs (same epochs and seed) whose unpruned accuracies to reuse")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    known = {}
    for path in args.plain_from:
        d = json.load(open(path))
        if d["epochs"] == args.epochs and d["seed"] == args.seed:
            known.update({r["net"]: r["acc_plain"] for r in d["rows"]})
    rows = []
    for name in args.nets.split(","):
        rows.append(run(name, args.epochs, args.ratio, args.seed, options, known))
        r = rows[-1]
        C.console.print(f"{name}: hard cut per epoch {[t[0] for t in r['trace']]}", style="dim")
        C.console.print(f"{name}: lambda per epoch {[t[1] for t in r['trace']]}", style="dim")
    C.console.print(C.table(
        f"SCP at a {args.ratio:.0%} FLOPs cut, {args.epochs} epochs, plain SGD loop, defaults {options or ''}",
        ["net", "BN sites / gates", "thresholds", "hard cut at end", "final cut", "acc masked", "acc pruned",
         "acc unpruned", "gap (pts)", "finalize -/+ ch", "ok", "SCP s"],
        [[r["net"], f"{r['sites']} / {r['gates']}", str(r["thresholds"]), r["hard_cut_end"], r["final_cut"],
          r["acc_masked"], r["acc_pruned"], r["acc_plain"], f"{r['acc_gap_pts']:+.2f}",
          f"{r['extra_cut']} / {r['extra_kept']}", r["ok"], r["scp_s"]] for r in rows]))
    for r in rows:
        C.console.print(f"{r['net']}: widths changed (width, hard rule at end, final) {r['widths']}", style="dim")
    C.write_json("bench_activations" + args.tag, {"epochs": args.epochs, "ratio": args.ratio, "seed": args.seed,
                                                  "options": options, "rows": rows})


if __name__ == "__main__":
    main()
