"""Ecosystem models as users bring them (issue 9): ultralytics YOLO, segmentation_models_pytorch,
Hugging Face transformers, timm NF nets and CrossViT, traced by the specialising capture.

Command (benchmark venv; about 14 minutes on 2 shared cores with Torch-Pruning)::

    nice -n 10 /work/benchenv/bin/python benchmarks/bench_ecosystem.py   # --models yolov8n hf_ViT ... --no-torch-pruning
    nice -n 10 /work/benchenv/bin/python benchmarks/bench_ecosystem.py --extra --no-torch-pruning --no-largest-cut --tag extra

Per model, built from its config (no weights; norms randomised as in bench_timm), batch 1:
traced (leaves left, with reasons), specialisations recorded (and whether one reads the
batch), ``analyze`` time (float32, after one warm-up call), the invariant in float64 on one
random legal drop (pruned == hard-masked, relative error), ``prune_one_shot(ratio=0.4)``'s
achieved cut, ONNX Runtime == torch on the pruned model (``softprune_fx.onnx_check``), and
the largest reachable cut (``prune_one_shot(ratio=0.99)``'s BudgetError, or its cut).

Torch-Pruning beside it (``--no-torch-pruning`` to skip), on a copy of the same model:
``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=1)``, ``round_to=8``, default
options otherwise (no ``num_heads``), ignoring the output head as Torch-Pruning's examples do
(YOLO's Detect/Segment/Classify module, smp's segmentation head, HF's ``classifier``, timm's
``get_classifier()``). Its ``pruning_ratio`` starts at 1 - sqrt(0.6) (a 40% FLOPs cut if every
layer lost that share of its input and output channels) and is corrected once,
``r * 0.4 / cut``, when the cut misses 40% by more than 2 points; the closer run is kept. Per
model: whether the pruner was built (the exception, short, if not), the constructor's time
(the dependency graph build), the FLOPs cut, counted for both tools by
``torch.utils.flop_counter.FlopCounterMode`` on the real pruned model, and whether the pruned
model still runs on the example input with the original's output shapes. A Torch-Pruning
failure or timeout is a recorded data point. Writes ``benchmarks/results/bench_ecosystem.json``
(``--tag T``: ``bench_ecosystem_T.json``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import signal
import tempfile
import time
import traceback
import warnings

import _common as C
import torch
from drops import random_drop  # tests/drops.py, on sys.path through _common
from torch import nn
from zoo_common import randomize_norms

import softprune_fx as sp
from softprune_fx.onnx_check import check_onnx, export_onnx
from softprune_fx.passes.errors import BudgetError

LIMIT_S = 300
TP_LIMIT_S = 240  # per Torch-Pruning attempt (build + step + check)
TP_TARGET = 0.4


class First(nn.Module):
    """The first tensor of a tuple/list output (YOLO's ``(y, feats)``), or HF's logits."""

    def __init__(self, model: nn.Module, hf: bool = False):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, x):
        y = self.model(pixel_values=x).logits if self.hf else self.model(x)
        return y[0] if isinstance(y, (tuple, list)) else y


def yolo(cfg: str, kind: str = "DetectionModel"):
    def build():
        from ultralytics.nn import tasks
        return First(getattr(tasks, kind)(cfg, verbose=False)), 224 if "cls" in cfg else 320
    return build


def smp_model(arch: str, encoder: str):
    def build():
        import segmentation_models_pytorch as smp
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None), 256
    return build


def hf(name: str):
    def build():
        import transformers as T
        cfg = getattr(T, f"{name}Config")()
        return First(getattr(T, f"{name}ForImageClassification")(cfg), hf=True), getattr(cfg, "image_size", 224)
    return build


def timm_model(name: str):
    def build():
        import timm
        m = timm.create_model(name, pretrained=False)
        return m, m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return build


MODELS = {
    "yolov8n": yolo("yolov8n.yaml"), "yolo11n": yolo("yolo11n.yaml"),
    "yolov8n-seg": yolo("yolov8n-seg.yaml", "SegmentationModel"),
    "yolov8n-cls": yolo("yolov8n-cls.yaml", "ClassificationModel"), "yolov8s": yolo("yolov8s.yaml"),
    **{f"smp_{a}_{e}": smp_model(a, e) for a in ("Unet", "FPN", "DeepLabV3Plus", "Linknet")
       for e in ("resnet18", "mobilenet_v2")},
    **{f"hf_{n}": hf(n) for n in ("ResNet", "ConvNext", "MobileNetV2", "EfficientNet", "ViT", "Swin")},
    **{f"timm_{n}": timm_model(n) for n in ("nf_resnet26", "nfnet_l0", "crossvit_tiny_240")},
}


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _reason(text: str) -> str:
    return re.split(r" at node | at ", text)[0][:70]


def largest_cut(model, x) -> float | None:
    try:
        _, res = sp.prune_one_shot(model, x, 0.99)
        return res.achieved_ratio
    except BudgetError as exc:
        m = re.search(r"reachable cut is ([\d.]+)%", str(exc))
        return float(m.group(1)) / 100 if m else None


def build(name: str) -> tuple[nn.Module, tuple, int]:
    """The model (seeded init, norms randomised, eval mode), its batch-1 example input and its size."""
    torch.manual_seed(0)
    model, px = MODELS[name]()
    randomize_norms(model, 0)
    model.eval()
    shape = (1, 3, px, px) if isinstance(px, int) else px  # a builder may give the whole shape (video)
    return model, (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),), px


def fcm_flops(model: nn.Module, x: tuple) -> int:
    """FLOPs of one eval forward on real tensors, by torch's FlopCounterMode (with the CPU
    attention kernel it has no formula for, as softprune-fx counts it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from softprune_fx.passes.flops import MORE_FORMULAS
    counter = FlopCounterMode(display=False, custom_mapping=MORE_FORMULAS)
    with torch.no_grad(), counter:
        model.eval()(*x)
    return counter.get_total_flops()


def check(name: str, model: nn.Module, x: tuple, px: int, largest: bool = True) -> dict:
    row = {"model": name, "input": px}
    sp.analyze(model, x)  # warm-up: imports, first-call caches
    start = time.perf_counter()
    cg = sp.analyze(model, x)
    row["analyze_s"] = time.perf_counter() - start
    row["leaves"] = dict(cg.gm.meta.get("untraced_why", {}))
    try:  # the captured graph computes what the model computes (softprune-fx prune checks it too)
        row["capture_diff"] = cg.check_capture(model)
    except Exception as exc:  # noqa: BLE001 - recorded, and the rest still runs
        row["capture_diff"], row["capture_error"] = None, _short(exc)
    row["specs"] = len(cg.specialisations)
    row["static_batch"] = bool(cg.gm.meta.get("static_batch"))
    row["groups"], row["prunable"] = len(cg.groups), sum(g.prunable for g in cg.groups)
    frozen: dict[str, int] = {}
    for g in cg.groups:
        if not g.prunable and g.frozen_reason not in ("model input", "reaches a model output"):
            frozen[_reason(g.frozen_reason)] = frozen.get(_reason(g.frozen_reason), 0) + 1
    row["frozen"] = frozen
    m64, x64 = model.double(), (x[0].double(),)
    drop = random_drop(sp.analyze(m64, x64), 0)
    with torch.no_grad():
        ref = sp.masked(m64, x64, drop)(*x64)
        got = sp.prune_channels(m64, x64, drop)(*x64)
        ref, got = (ref[0], got[0]) if isinstance(ref, (tuple, list)) else (ref, got)
    row["invariant_rel"] = float((ref - got).abs().max() / max(1.0, float(ref.abs().max())))
    model.float()
    try:
        pruned, res = sp.prune_one_shot(model, x, 0.4)
        row["cut"] = res.achieved_ratio
        try:  # torch's module tracker fails on some timm originals (PiT, CaiT): not ours to count
            row["cut_fcm"] = 1 - fcm_flops(pruned, x) / fcm_flops(model, x)
        except AssertionError as exc:
            row["cut_fcm"], row["fcm_error"] = None, str(exc)[:80]
        with tempfile.TemporaryDirectory() as tmp:
            info = export_onnx(pruned, x, f"{tmp}/p.onnx")
            row["onnx_ok"] = check_onnx(pruned, x, f"{tmp}/p.onnx").ok
            row["exporter"] = info.exporter
    except BudgetError as exc:
        row["cut"], row["budget"] = None, " ".join(str(exc).split())[:160]
    row["largest_cut"] = largest_cut(model, x) if largest else None
    return row


def tp_ignored(name: str, model: nn.Module) -> list[nn.Module]:
    """The output head Torch-Pruning's examples leave alone, for each family here."""
    inner = getattr(model, "model", model)
    if name.startswith("yolo"):
        return [inner.model[-1]]  # Detect / Segment / Classify, as in TP's YOLOv8 example
    if name.startswith("smp_"):
        return [m for m in (getattr(model, "segmentation_head", None), getattr(model, "classification_head", None)) if m]
    if name.startswith("hf_"):
        return [inner.classifier]
    if name.startswith("timm_"):
        return [model.get_classifier()]
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _shapes(out) -> list:
    from softprune_fx.onnx_check import flatten_outputs
    return [tuple(t.shape) for _, t in flatten_outputs(out)]


def tp_attempt(name: str, model: nn.Module, x: tuple, ratio: float, flops0: int) -> dict:
    """One Torch-Pruning run on a copy: build (timed), step, FLOPs cut, does it still run."""
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    out = {"pruning_ratio": round(ratio, 4), "built": False}
    signal.alarm(TP_LIMIT_S)
    try:
        start = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(m, x[0], importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, round_to=8, ignored_layers=tp_ignored(name, m))
        out["build_s"], out["built"] = time.perf_counter() - start, True
        pruner.step()
        out["stepped"] = True
        with torch.no_grad():
            want, got = _shapes(model(*x)), _shapes(m(*x))
        out["runs"], out["same_shapes"] = True, want == got
        out["cut"] = 1 - fcm_flops(m, x) / flops0
    except _Timeout:
        out["error"] = f"over {TP_LIMIT_S} s"
    except Exception as exc:  # noqa: BLE001 - a Torch-Pruning failure is a data point
        out["error"] = _short(exc)
        out["where"] = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                        for f in traceback.extract_tb(exc.__traceback__)][-2:]
        if out.get("stepped"):
            out.setdefault("runs", False)
    finally:
        signal.alarm(0)
    return out


def torch_pruning(name: str, model: nn.Module, x: tuple) -> dict:
    """Torch-Pruning near a 40% FLOPs cut: one run, and one ratio correction if it misses."""
    flops0 = fcm_flops(model, x)
    first = tp_attempt(name, model, x, 1 - math.sqrt(1 - TP_TARGET), flops0)
    cut = first.get("cut")
    if not cut or abs(cut - TP_TARGET) <= 0.02:
        return {**first, "attempts": 1}
    second = tp_attempt(name, model, x, min(0.9, first["pruning_ratio"] * TP_TARGET / cut), flops0)
    better = second if second.get("cut") and abs(second["cut"] - TP_TARGET) < abs(cut - TP_TARGET) else first
    return {**better, "build_s": first["build_s"], "attempts": 2}


def tp_cell(tp: dict | None) -> str:
    """``built s | cut | runs`` for the table; the error, short, where it failed."""
    if not tp:
        return "- | - | -"
    build = f"{tp['build_s']:.2f}" if tp.get("built") else "no: " + tp.get("error", "?")[:70]
    cut = "-" if tp.get("cut") is None else f"{tp['cut']:.3f}"
    if not tp.get("built"):
        runs = "-"
    elif not tp.get("stepped"):
        runs = "step failed: " + tp.get("error", "?")[:70]
    elif tp.get("runs"):
        runs = "yes" if tp.get("same_shapes") else "yes (output shape changed)"
    else:
        runs = "no: " + tp.get("error", "?")[:70]
    return f"{build} | {cut} | {runs}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | px | traced (leaves) | capture == model | specialisations | analyze s | prunable/groups | "
            "invariant f64 | one-shot 0.4 cut (FCM) | ORT == torch | largest cut | other frozen | "
            "TP build s | TP cut (FCM) | TP pruned runs |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | FAIL: {r['error'][:80]} |" + " |" * 9 + f" {tp_cell(r.get('tp'))} |")
            continue
        leaves = "yes (0)" if not r["leaves"] else f"{len(r['leaves'])} leaves: " + "; ".join(
            f"{k}: {v[:60]}" for k, v in r["leaves"].items())
        cut = "-" if r.get("cut") is None else f"{r['cut']:.3f}" + (f" ({r['cut_fcm']:.3f})" if r.get("cut_fcm") is not None else "")
        big = "-" if r.get("largest_cut") is None else f"{r['largest_cut']:.3f}"
        other = "; ".join(f"{k} (x{v})" for k, v in sorted(r["frozen"].items(), key=lambda kv: -kv[1])[:2])
        same = "-" if "capture_diff" not in r else ("no: " + r["capture_error"][:60] if r["capture_diff"] is None
                                                    else f"yes ({r['capture_diff']:.0e})")
        lines.append(f"| {r['model']} | {r['input']} | {leaves} | {same} | {r['specs']}{' (batch)' if r['static_batch'] else ''}"
                     f" | {r['analyze_s']:.2f} | {r['prunable']}/{r['groups']} | {r['invariant_rel']:.0e} | {cut} | "
                     f"{r.get('onnx_ok', '-')} | {big} | {other or '-'} | {tp_cell(r.get('tp'))} |")
    return "\n".join(lines)


def guarded(fn, *args) -> tuple[object, dict | None]:
    """``fn(*args)`` under LIMIT_S; an exception or timeout as ``(None, error row)``."""
    signal.alarm(LIMIT_S)
    try:
        return fn(*args), None
    except _Timeout:
        return None, {"error": f"over {LIMIT_S} s"}
    except Exception as exc:  # noqa: BLE001 - recorded per model
        return None, {"error": _short(exc), "where": [f"{f.filename.split('/')[-1]}:{f.lineno}"
                                                      for f in traceback.extract_tb(exc.__traceback__)][-3:]}
    finally:
        signal.alarm(0)


def run_one(name: str, with_tp: bool, largest: bool = True) -> dict:
    """Ours, then Torch-Pruning on the same built model; a failure of either is recorded."""
    built, err = guarded(build, name)
    if err:
        return {"model": name, **err}
    model, x, px = built
    row, err = guarded(check, name, model, x, px, largest)
    row = row or {"model": name, **err}
    if with_tp:
        model.float()
        tp, err = guarded(torch_pruning, name, model, x)
        row["tp"] = tp or {"built": False, **err}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every model of the chosen list")
    ap.add_argument("--extra", action="store_true", help="the models of ecosystem_extra.py (section 13)")
    ap.add_argument("--torchvision", action="store_true", help="the models of ecosystem_torchvision.py")
    ap.add_argument("--no-largest-cut", action="store_true", help="skip the ratio-0.99 run per model")
    ap.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning columns")
    ap.add_argument("--tag", default="", help="write bench_ecosystem_TAG.json")
    args = ap.parse_args()
    if args.extra:
        from ecosystem_extra import extra_models
        extra = extra_models(yolo, hf, smp_model, timm_model)
        MODELS.update(extra)
    if args.torchvision:
        from ecosystem_torchvision import torchvision_models
        extra = torchvision_models()
        MODELS.update(extra)
    names = args.models or list(extra if args.extra or args.torchvision else MODELS)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name in names:
        rows.append(run_one(name, not args.no_torch_pruning, not args.no_largest_cut))
        tp = rows[-1].get("tp") or {}
        C.console.print(f"  {name}: {rows[-1].get('error') or 'ok'}; Torch-Pruning: "
                        f"{tp.get('error') or ('cut %.3f' % tp['cut'] if tp.get('cut') is not None else '-')}",
                        style="dim")
    print(markdown(rows))
    C.write_json("bench_ecosystem" + (f"_{args.tag}" if args.tag else ""), {"rows": rows})


if __name__ == "__main__":
    main()
