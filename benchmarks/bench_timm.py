"""timm's model families: invariant, empty-mask identity, one-shot pruning and ONNX Runtime.

Needs the torchvision environment of ``bench_torchvision.py`` plus timm::

    /tmp/tvenv/bin/pip install --no-deps timm && /tmp/tvenv/bin/pip install pyyaml huggingface_hub safetensors
    /tmp/tvenv/bin/python benchmarks/bench_timm.py --tag part1 --models resnet26d seresnet50 ...
    /tmp/tvenv/bin/python benchmarks/bench_timm.py --merge part1 part2     # -> results/bench_timm.json

Every model is ``timm.create_model(name, pretrained=False, num_classes=10)``, eval mode, every
norm's affine parameters and BN running statistics randomised with seed 0 (as in
``bench_torchvision.py``); the input is timm's ``input_size`` for the model (``--px N``:
N x N instead), batch 2. One torch thread. Per model:

* float64: ``analyze``; ``masked(m, x, {})(x)`` must equal ``m(x)`` exactly; two random legal
  drops (``tests/drops.py``, seeds 0 and 1): ``prune_channels(m, x, drop)(x)`` vs
  ``masked(m, x, drop)(x)`` within ``1e-10 * max(1, max|ref|)``;
* float32, batch 1: ``prune_one_shot(m, x, 0.4)`` (defaults), then ``export_onnx`` (dynamic
  batch axis) and ``check_onnx`` in ONNX Runtime at batch 2.

A model whose analysis finds nothing prunable, or whose one-shot cut is unreachable, is
reported as such (a BudgetError naming the largest reachable cut is a correct answer, not
a failure). Any other exception is a failure, recorded with its message and where it came
from. Randomised statistics can make a deep network numerically unstable: the original's
own float32 output is compared with its float64 output, and where they differ by more than
ORT's tolerance (1e-4 relative) an invariant or ORT miss is reported as "unstable original",
not counted as a pruning failure. ``--merge`` keeps, per model, the row of the last tag. Writes ``benchmarks/results/bench_timm[_TAG].json``.
"""
from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
import traceback
import warnings

import _common as C
import torch

import softprune_fx as sp
from drops import random_drop  # tests/drops.py, on sys.path through _common
from zoo_common import randomize_norms
from softprune_fx.passes.errors import BudgetError
from softprune_fx.onnx_check import check_onnx, export_onnx

TOL64 = 1e-10
LIMIT_S = 240
UNSTABLE = 1e-4  # the original's own float32-vs-float64 error beyond ORT's tolerance


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _where(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames if "/softprune_fx/" in f.filename
            or "/passes/" in f.filename][-2:]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def one_shot(model, x) -> dict:
    """prune_one_shot at 0.4 with the defaults, exported and checked in ONNX Runtime."""
    out = {}
    xf = (x[:1].float(),)
    try:
        pruned, res = sp.prune_one_shot(model.float(), xf, 0.4)
    except BudgetError as exc:
        return {"cut": None, "budget": " ".join(str(exc).split())}
    out["cut"] = res.achieved_ratio
    with tempfile.TemporaryDirectory() as tmp:
        info = export_onnx(pruned, xf, f"{tmp}/p.onnx")
        chk = check_onnx(pruned, torch.randn(2, *xf[0].shape[1:]), f"{tmp}/p.onnx")
        out.update(onnx_ok=chk.ok, onnx_exporter=info.exporter)
    return out


def check(name: str, px: int) -> dict:
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=10)
    randomize_norms(model, 0)
    model.eval().double()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]) if not px else (px, px)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    row = {"model": name, "input": list(size)}
    start = time.perf_counter()
    cg = sp.analyze(model, (x,))
    row["analyze_s"] = time.perf_counter() - start
    row["groups"], row["prunable"] = len(cg.groups), sum(g.prunable for g in cg.groups)
    reasons: dict[str, int] = {}
    for g in cg.groups:
        if not g.prunable and g.frozen_reason not in ("model input", "reaches a model output"):
            key = g.frozen_reason.split(" at node ")[0].split(" at ")[0][:90]
            reasons[key] = reasons.get(key, 0) + 1
    row["frozen"] = reasons
    with torch.no_grad():
        row["identity"] = bool(torch.equal(model(x), sp.masked(model, (x,), {})(x)))
        worst = 0.0
        for seed in (0, 1) if row["prunable"] else ():  # nothing prunable: nothing to drop
            drop = random_drop(cg, seed)
            if drop:
                ref = sp.masked(model, (x,), drop)(x)
                got = sp.prune_channels(model, (x,), drop)(x)
                worst = max(worst, float((ref - got).abs().max() / max(1.0, float(ref.abs().max()))))
    row["invariant_rel"] = worst
    row["invariant_ok"] = worst <= TOL64 and row["identity"]
    with torch.no_grad():  # how far the original itself moves between float64 and float32
        y64 = model(x)
        y32 = model.float()(x.float()).double()
        model.double()
    row["original_f32_rel"] = float((y32 - y64).abs().max() / max(1.0, float(y64.abs().max())))
    if row["prunable"]:
        row.update(one_shot(model, x))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[])
    ap.add_argument("--px", type=int, default=0, help="square input size (0: timm's input_size)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--merge", nargs="+", default=[], metavar="TAG")
    args = ap.parse_args()
    if args.merge:
        by_model: dict[str, dict] = {}
        for tag in args.merge:  # a later tag's row for a model replaces an earlier one
            for row in json.loads((C.RESULTS / f"bench_timm_{tag}.json").read_text())["rows"]:
                by_model[row["model"]] = {**row, "tag": tag}
        rows = list(by_model.values())
        report(rows)
        C.write_json("bench_timm", {"rows": rows, "merged": args.merge})
        return
    import timm
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name in args.models:
        signal.alarm(LIMIT_S)
        try:
            row = check(name, args.px)
        except _Timeout:
            row = {"model": name, "error": f"over {LIMIT_S} s"}
        except Exception as exc:  # noqa: BLE001 - recorded per model
            row = {"model": name, "error": _error(exc), "where": _where(exc)}
        finally:
            signal.alarm(0)
        rows.append(row)
        C.console.print(f"  {name}: {row.get('error') or 'ok'}", style="dim")
    report(rows)
    C.write_json("bench_timm" + (f"_{args.tag}" if args.tag else ""), {"rows": rows, "timm": timm.__version__})


def report(rows: list[dict]) -> None:
    def verdict(r):
        if "error" in r:
            return "FAIL: " + r["error"][:60]
        unstable = r.get("original_f32_rel", 0) > UNSTABLE
        if not r["invariant_ok"] or r.get("onnx_ok") is False:
            what = "invariant" if not r["invariant_ok"] else "ORT"
            return f"unstable original ({what})" if unstable else f"FAIL: {what}"
        return "ok"
    table = [[r["model"], f"{r.get('prunable', '-')}/{r.get('groups', '-')}",
              "-" if r.get("invariant_rel") is None else f"{r['invariant_rel']:.0e}",
              "-" if r.get("cut") is None else f"{r['cut']:.3f}", verdict(r),
              "; ".join(f"{k} (x{v})" for k, v in r.get("frozen", {}).items())[:70]] for r in rows]
    C.console.print(C.table("timm models: invariant (float64), one-shot 0.4 and ONNX Runtime",
                            ["model", "prunable/groups", "invariant", "one-shot cut", "verdict",
                             "other frozen reasons"], table))
    ok = sum(verdict(r) == "ok" for r in rows)
    C.console.print(f"{ok}/{len(rows)} models pass")


if __name__ == "__main__":
    main()
