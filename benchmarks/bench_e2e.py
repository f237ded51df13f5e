"""End to end: ``prune_one_shot(m, x, ratio=0.4)`` vs Torch-Pruning's whole prune.

Command (bench venv, a few minutes on 2 cores)::

    /work/benchenv/bin/python benchmarks/bench_e2e.py                 # resnet50 mobilenet_v2 densenet121
    /work/benchenv/bin/python benchmarks/bench_e2e.py --stages        # + where the time goes
    /work/benchenv/bin/python benchmarks/bench_e2e.py --budget-sweep  # ratio 0.999 on section 6's models

Default mode: torchvision models (``weights=None``, BN randomised as in ``bench_torchvision``),
224 px, batch 1, one torch thread, interleaved repeats (median of 3). softprune-fx:
``prune_one_shot(model, (x,), ratio=0.4)`` with its defaults (exactness check included),
with the time spent in ``decide`` measured inside the same call. Torch-Pruning:
``MagnitudePruner(model, x, importance=MagnitudeImportance(p=1), pruning_ratio=0.25,
round_to=16, ignored_layers=[classifier])`` built and stepped, on a fresh copy each time.
Each timed call starts after a ``gc.collect()``: otherwise one tool's collector pays for
the cycles the other left (Torch-Pruning's MobileNetV2 measured 0.48 s instead of 0.10 s).
``--stages`` adds, per repeat, one more softprune-fx call with the analysis, ``decide`` and
the exactness check's two real forwards timed inside it (a lower bound for any prune that
checks its result the way this one does).

``--budget-sweep``: ``prune_one_shot(model, (x,), 0.999, round_to=None)`` once per model of
BENCHMARKS.md section 6: whether it returns or raises ``BudgetError``, and in how long.

Writes ``benchmarks/results/bench_e2e.json`` (or ``bench_e2e_sweep.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time

import _common as C
import torch
from bench_torchvision import MODELS, build

import softprune_fx as sp
import softprune_fx.finish as pruner  # decide is called from finish()
from softprune_fx.passes.errors import BudgetError

E2E_MODELS = ("resnet50", "mobilenet_v2", "densenet121")


class StageTimer:
    """Adds up the seconds spent in named stages of one ``prune_one_shot`` call, by
    wrapping ``(owner, attribute)`` callables for the duration of the ``with`` block:
    ``decide``, and with ``check=True`` the exactness check's two forwards (the masked
    reference, ``ChannelGraph.run_masked``, and the pruned model's counted forward, the
    ``flop_counter`` block of ``finish``) and the analysis (``analyze``)."""

    def __init__(self, check: bool = False):
        self.seconds: dict[str, float] = {}
        self.check = check
        self._wrapped = [(pruner, "decide", "decide")]
        if check:
            import softprune_fx.graph as graph
            import softprune_fx.oneshot as oneshot
            self._wrapped += [(graph.ChannelGraph, "run_masked", "masked reference forward"),
                              (oneshot, "analyze", "analysis")]
        self._saved = []

    def _timed(self, fn, key):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
        return timed

    def __enter__(self):
        for owner, attr, key in self._wrapped:
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, self._timed(getattr(owner, attr), key))
        if self.check:  # the pruned model's counted forward is finish's flop_counter block
            timer, base = self, pruner.flop_counter

            @contextlib.contextmanager
            def timed_counter(model):
                t = time.perf_counter()
                with base(model) as counter:
                    yield counter
                key = "pruned counted forward"
                timer.seconds[key] = timer.seconds.get(key, 0.0) + time.perf_counter() - t
            self._saved.append((pruner, "flop_counter", base))
            pruner.flop_counter = timed_counter
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()


def classifier(model) -> torch.nn.Module:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def tp_prune(model, x) -> float:
    import torch_pruning as tp
    m = copy.deepcopy(model)
    gc.collect()  # the other tool's garbage is not this one's to collect inside the timing
    t = time.perf_counter()
    pr = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                   pruning_ratio=0.25, round_to=16, ignored_layers=[classifier(m)])
    pr.step()
    return time.perf_counter() - t


def sp_prune(model, x, stages: dict | None = None) -> tuple[float, float, float]:
    """Seconds, seconds in decide, FLOPs cut; ``stages`` (a dict) collects the check's
    forwards and the analysis too, lists of seconds by stage name."""
    with StageTimer(check=stages is not None) as timer:
        gc.collect()
        t = time.perf_counter()
        _, result = sp.prune_one_shot(model, (x,), ratio=0.4)
        total = time.perf_counter() - t
    for key, seconds in (timer.seconds.items() if stages is not None else ()):
        stages.setdefault(key, []).append(seconds)
    return total, timer.seconds.get("decide", 0.0), result.achieved_ratio


def e2e(repeats: int, models=E2E_MODELS, stages: bool = False) -> dict:
    rows = {}
    for name in models:
        model, x = build(name), torch.randn(1, 3, 224, 224)
        sp_prune(model, x), tp_prune(model, x)          # warm-up
        sp_t, dec_t, tp_t, cut, parts = [], [], [], 0.0, {}
        for r in range(repeats):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    t, d, cut = sp_prune(model, x)
                    sp_t.append(t)
                    dec_t.append(d)
                else:
                    tp_t.append(tp_prune(model, x))
            if stages:  # a separate, wrapped run: the headline runs carry no wrappers
                parts.setdefault("total", []).append(sp_prune(model, x, parts)[0])
        row = {"prune_one_shot_s": C.med(sp_t), "decide_s": C.med(dec_t), "tp_s": C.med(tp_t),
               "ratio": C.med([a / b for a, b in zip(sp_t, tp_t)]), "achieved": cut,
               "decide_share": C.med([d / t for d, t in zip(dec_t, sp_t)]), "runs": {"sp": sp_t, "tp": tp_t}}
        if stages:
            row["stages_s"] = {k: C.med(v) for k, v in parts.items()}
            row["stages_runs"] = parts
        rows[name] = row
        C.console.print(f"{name}: prune_one_shot {row['prune_one_shot_s']:.3f} s (decide {row['decide_s']:.3f} s, "
                        f"{row['decide_share']:.1%}), TP build+step {row['tp_s']:.3f} s, ratio {row['ratio']:.2f}x, "
                        f"cut {cut:.3f}")
        for key, sec in row.get("stages_s", {}).items():
            C.console.print(f"    {key}: {sec * 1e3:.1f} ms ({sec / row['tp_s']:.2f} of Torch-Pruning's whole prune)")
    return rows


def sweep(limit: float) -> dict:
    rows = {}
    for name in MODELS:
        model = build(name)
        x = torch.randn(1, 3, 299 if name == "inception_v3" else 224, 299 if name == "inception_v3" else 224)
        with StageTimer() as timer:
            t = time.perf_counter()
            try:
                _, result = sp.prune_one_shot(model, (x,), 0.999, round_to=None)
                outcome = f"returned, cut {result.achieved_ratio:.4f}"
            except BudgetError as exc:
                outcome = f"BudgetError: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                outcome = f"error {type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t
        rows[name] = {"seconds": seconds, "decide_s": timer.seconds.get("decide", 0.0), "outcome": outcome, "within": seconds <= limit}
        C.console.print(f"{name}: {seconds:.2f} s (decide {timer.seconds.get('decide', 0.0):.2f} s) {outcome}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-sweep", action="store_true")
    ap.add_argument("--limit", type=float, default=10.0)
    ap.add_argument("--models", nargs="+", default=list(E2E_MODELS), help="default: %(default)s")
    ap.add_argument("--stages", action="store_true",
                    help="also time the analysis, decide and the check's two forwards inside extra runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"machine": C.machine()}
    if args.budget_sweep:
        out["sweep"] = sweep(args.limit)
        C.write_json("bench_e2e_sweep", out)
    else:
        out["e2e"] = e2e(args.repeats, args.models, args.stages)
        C.write_json("bench_e2e" if tuple(args.models) == E2E_MODELS else "bench_e2e_partial", out)


if __name__ == "__main__":
    main()
