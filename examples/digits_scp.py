"""SCP on real data: the digits ResNet trained from scratch jointly with soft masks at a
40% FLOPs cut, against the same network trained without masks for the same epochs.

    python examples/digits_scp.py                     # seed 0, 15 epochs, 1 thread
    python examples/digits_scp.py --seeds 0 1 2       # one row per seed

Prints a table: FLOPs cut (``torch.utils.flop_counter.FlopCounterMode`` on the pruned
and the original model), validation accuracy pruned vs unpruned, and seconds per run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402

from softprune_fx.train import train_plain, train_scp  # noqa: E402


def flops(model: torch.nn.Module) -> int:
    """FLOPs of one eval-mode forward on ``digits.example_inputs()``, as FlopCounterMode counts them.

    Example:
        >>> flops(digits.build()) > 0
        True
    """
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*digits.example_inputs())
    model.train(was)
    return counter.get_total_flops()


def run_seed(seed: int, epochs: int, ratio: float, batch_size: int, progress: bool) -> dict:
    """Train both networks from the same initial weights; returns one table row's figures.

    Example:
        >>> row = run_seed(0, epochs=15, ratio=0.4, batch_size=64, progress=False)  # doctest: +SKIP
    """
    train_loader, val_loader = digits.loaders(batch_size)
    torch.manual_seed(seed)
    init = digits.build()
    start = time.perf_counter()
    pruned, result, info = train_scp(copy.deepcopy(init), digits.example_inputs(), train_loader, val_loader,
                                     ratio=ratio, epochs=epochs, seed=seed, progress=progress)
    scp_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain, plain_info = train_plain(copy.deepcopy(init), train_loader, val_loader, epochs, seed=seed,
                                    progress=progress)
    plain_seconds = time.perf_counter() - start
    before, after = flops(plain), flops(pruned)
    return {"seed": seed, "cut": 1.0 - after / before, "acc_pruned": info["accuracy_pruned"],
            "acc_masked": info["accuracy_masked"], "acc_plain": plain_info["accuracy"],
            "scp_seconds": scp_seconds, "plain_seconds": plain_seconds,
            "hard_max": max(h["hard_flops_ratio"] for h in info["history"])}


def table(rows: list[dict], ratio: float, epochs: int) -> Table:
    """The result table: one row per seed, then the mean when there are several."""
    t = Table(title=f"digits ResNet-14, SCP at a {ratio:.0%} FLOPs cut vs unpruned, {epochs} epochs each")
    for col in ("seed", "FLOPs cut", "acc pruned", "acc unpruned", "diff (pts)", "SCP s", "plain s"):
        t.add_column(col, justify="right")
    if len(rows) > 1:
        rows = rows + [{"seed": "mean", **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "seed"}}]
    for r in rows:
        t.add_row(str(r["seed"]), f"{r['cut']:.2%}", f"{r['acc_pruned']:.2%}", f"{r['acc_plain']:.2%}",
                  f"{100 * (r['acc_pruned'] - r['acc_plain']):+.2f}", f"{r['scp_seconds']:.1f}",
                  f"{r['plain_seconds']:.1f}")
    return t


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads crawl when the other core is busy
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [run_seed(s, args.epochs, args.ratio, args.batch_size, not args.no_progress) for s in args.seeds]
    console = Console()
    console.print(table(rows, args.ratio, args.epochs))
    console.print(f"total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
