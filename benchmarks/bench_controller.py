"""The budget controller on every zoo architecture: does the hard-rule cut reach the target
during a short SCP run, and does finalize land within 1 point?

Command (about 2 minutes on 2 cores)::

    python benchmarks/bench_controller.py            # --ratio 0.4 --epochs 30

Each ZOO model trains ``train_scp`` with the defaults on 32 random inputs of its example
shape (labels from channel-mean signs; batch 4, so 8 steps an epoch), lr 0.1, one thread.
Reported per model: the largest hard-rule cut seen at an epoch end, the epoch it first came
within 1 point of the target, the cut finalize achieved, and pruned == masked. A model the
controller cannot drive (too small a prunable share, or an error) is reported, not hidden.
Writes ``benchmarks/results/bench_controller.json``.
"""
from __future__ import annotations

import argparse
import time

import _common as C
import torch
from test_train import synthetic_loaders
from zoo import ZOO

from softprune_fx.train import train_scp


def run(name: str, ratio: float, epochs: int) -> dict:
    model, inputs = ZOO[name]()
    model.train()
    if not all(t.is_floating_point() for t in inputs) or len(inputs) != 1:
        return {"model": name, "skipped": "needs one float input for the synthetic loader"}
    train, val = synthetic_loaders(inputs[0].shape, batch_size=4)
    t0 = time.perf_counter()
    try:
        _, result, info = train_scp(model, inputs, train, val, ratio=ratio, epochs=epochs, lr=0.1, seed=0,
                                    progress=False)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"model": name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}
    cuts = [h["hard_flops_ratio"] for h in info["history"]]
    first = next((i + 1 for i, c in enumerate(cuts) if c >= ratio - 0.01), None)
    return {"model": name, "max_hard_cut": max(cuts), "first_epoch_on_target": first,
            "final_hard_cut": cuts[-1], "achieved": result.achieved_ratio,
            "within_1pt": abs(result.achieved_ratio - ratio) <= 0.01, "max_abs_diff": result.max_abs_diff,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--models", default=",".join(sorted(ZOO)))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run(name, args.ratio, args.epochs) for name in args.models.split(",")]
    C.console.print(C.table(
        f"controller: hard-rule cut during {args.epochs} epochs, target {args.ratio}",
        ["model", "max hard cut", "first epoch on target", "final hard cut", "finalize cut", "within 1 pt",
         "pruned vs masked", "s / note"],
        [[r["model"], *(C.fmt(r.get(k)) for k in ("max_hard_cut", "first_epoch_on_target", "final_hard_cut",
                                                   "achieved", "within_1pt", "max_abs_diff")),
          r.get("error") or r.get("skipped") or C.fmt(r.get("seconds"))] for r in rows]))
    reached = sum(1 for r in rows if r.get("max_hard_cut", 0) >= args.ratio - 0.01)
    landed = sum(1 for r in rows if r.get("within_1pt"))
    C.console.print(f"hard cut reached the target on {reached}/{len(rows)}; finalize within 1 point on "
                    f"{landed}/{len(rows)}")
    C.write_json("bench_controller", {"machine": C.machine(), "ratio": args.ratio, "epochs": args.epochs,
                                      "rows": rows, "reached": reached, "landed": landed})


if __name__ == "__main__":
    main()
