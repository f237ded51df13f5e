"""Mask overhead: one SCP training step of ``SoftPruner(resnet50).model`` vs the plain model.

Command (about 2 minutes on 2 cores)::

    python benchmarks/bench_mask_overhead.py      # --batch 8 --repeats 10 --threads 1

A step is forward + cross-entropy (+ ``pruner.regularization()`` for the masked model) +
backward + ``SGD.step()`` on a batch of 8 at 224 px, both models in train mode, each with
its own SGD (lr 1e-3, momentum 0.9). Two untimed warm-up steps each, then the two models
alternate (the order swaps every repeat); medians and the median of the per-repeat
ratios. Also timed: the masked model's step without the regulariser, and the forward
alone. Issue 3's target: masked / plain <= 1.15.
Writes ``benchmarks/results/bench_mask_overhead.json``.
"""
from __future__ import annotations

import argparse
import copy
import time

import _common as C
import torch
import torch.nn.functional as F
from zoo_big import resnet50

import softprune_fx

TARGET = 1.15


def make_step(model, opt, x, y, reg=None):
    def step():
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_forward(model, x):
    def fwd():
        with torch.no_grad():
            model(x)
    return fwd


def run_pair(fns: dict, warmup: int, repeats: int) -> dict:
    """Time the callables in ``fns`` interleaved (rotating order); lists of seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, inputs = resnet50()
    plain = copy.deepcopy(model).train()
    pruner = softprune_fx.SoftPruner(model, inputs, 0.4)
    masked = pruner.model.train()
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_m = torch.optim.SGD(pruner.param_groups(), lr=1e-3, momentum=0.9)
    steps = {"plain": make_step(plain, opt_p, x, y),
             "masked": make_step(masked, opt_m, x, y, pruner.regularization),
             "masked_noreg": make_step(masked, opt_m, x, y)}
    times = run_pair(steps, 2, args.repeats)
    fwd = run_pair({"plain": make_forward(plain, x), "masked": make_forward(masked, x)}, 1, args.repeats)

    def ratio(t, a, b):
        return C.med([p / q for p, q in zip(t[a], t[b])])
    res = {
        "step_plain_s": C.med(times["plain"]), "step_masked_s": C.med(times["masked"]),
        "step_masked_noreg_s": C.med(times["masked_noreg"]),
        "step_ratio": ratio(times, "masked", "plain"),
        "step_ratio_of_medians": C.med(times["masked"]) / C.med(times["plain"]),
        "step_noreg_ratio": ratio(times, "masked_noreg", "plain"),
        "forward_plain_s": C.med(fwd["plain"]), "forward_masked_s": C.med(fwd["masked"]),
        "forward_ratio": ratio(fwd, "masked", "plain"),
        "spread": {k: C.spread(v) for k, v in times.items()},
        "mask_sites": len(pruner.bank.sites), "progress": pruner.progress()["hard_flops_ratio"],
    }
    rows = [["train step (fwd+bwd+SGD)", res["step_plain_s"], res["step_masked_s"], res["step_ratio"],
             f"{res['spread']['plain']:.2f}/{res['spread']['masked']:.2f}"],
            ["train step, no regulariser", res["step_plain_s"], res["step_masked_noreg_s"],
             res["step_noreg_ratio"], f"-/{res['spread']['masked_noreg']:.2f}"],
            ["forward only (no_grad, train mode)", res["forward_plain_s"], res["forward_masked_s"],
             res["forward_ratio"], ""]]
    C.console.print(C.table(
        f"ResNet-50 mask overhead, batch {args.batch} @ 224 px, {args.threads} thread(s), median of {args.repeats}",
        ["what", "plain s", "masked s", "masked/plain", "spread plain/masked"], rows))
    met = res["step_ratio"] <= TARGET
    C.console.print(f"issue 3 target: step ratio {res['step_ratio']:.3f} {'<=' if met else '>'} {TARGET}: "
                    f"{'met' if met else 'MISSED'}")
    C.write_json("bench_mask_overhead", {"batch": args.batch, "repeats": args.repeats, "threads": args.threads,
                                         "target": TARGET, "target_met": met, **res})


if __name__ == "__main__":
    main()
