"""Capture and ``prune_one_shot(0.4)`` medians on torchvision's MobileNetV2 (one torch thread), for
comparing two checkouts interleaved on the same host (BENCHMARKS.md section 15)::

    git worktree add /tmp/old <commit> && ln -s /tmp/old/passes /tmp/old/softprune_fx/passes
    cd /tmp && for i in 1 2; do PYTHONPATH=/tmp/old python /work/main/benchmarks/bench_ab.py; \\
        python /work/main/benchmarks/bench_ab.py; done
"""
import gc
import statistics
import time

import torch
import torchvision

import softprune_fx as sp
from softprune_fx.passes.capture import capture


def main() -> None:
    torch.set_num_threads(1)
    model, x = torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 224, 224),)
    for _ in range(3):
        capture(model, x)
        sp.prune_one_shot(model, x, 0.4)
    cap, one = [], []
    for _ in range(15):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        capture(model, x)
        cap.append(time.perf_counter() - start)
        gc.enable()
    for _ in range(9):
        gc.collect()
        start = time.perf_counter()
        sp.prune_one_shot(model, x, 0.4)
        one.append(time.perf_counter() - start)
    print(f"{sp.__file__}: capture {statistics.median(cap) * 1e3:.2f} ms, "
          f"prune_one_shot {statistics.median(one) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
