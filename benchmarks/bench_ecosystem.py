"""Ecosystem models as users bring them (issue 9): ultralytics YOLO, segmentation_models_pytorch,
Hugging Face transformers, timm NF nets and CrossViT, traced by the specialising capture.

Command (benchmark venv; about 10 minutes on 2 shared cores)::

    /work/benchenv/bin/python benchmarks/bench_ecosystem.py            # --models yolov8n hf_vit ...

Per model, built from its config (no weights; norms randomised as in bench_timm), batch 1:
traced (leaves left, with reasons), specialisations recorded (and whether one reads the
batch), ``analyze`` time (float32, after one warm-up call), the invariant in float64 on one
random legal drop (pruned == hard-masked, relative error), ``prune_one_shot(ratio=0.4)``'s
achieved cut, ONNX Runtime == torch on the pruned model (``softprune_fx.onnx_check``), and
the largest reachable cut (``prune_one_shot(ratio=0.99)``'s BudgetError, or its cut).
Writes ``benchmarks/results/bench_ecosystem.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
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


class First(nn.Module):
    """The first tensor of a tuple/list output (YOLO's ``(y, feats)``), or HF's logits."""

    def __init__(self, model: nn.Module, hf: bool = False):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, x):
        y = self.model(pixel_values=x).logits if self.hf else self.model(x)
        return y[0] if isinstance(y, (tuple, list)) else y


def yolo(cfg: str, kind: str = "DetectionModel"):
    from ultralytics.nn import tasks
    return lambda: (First(getattr(tasks, kind)(cfg, verbose=False)), 224 if "cls" in cfg else 320)


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


def check(name: str) -> dict:
    model, px = MODELS[name]()
    randomize_norms(model, 0)
    model.eval()
    x = (torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0)),)
    row = {"model": name, "input": px}
    sp.analyze(model, x)  # warm-up: imports, first-call caches
    start = time.perf_counter()
    cg = sp.analyze(model, x)
    row["analyze_s"] = time.perf_counter() - start
    row["leaves"] = dict(cg.gm.meta.get("untraced_why", {}))
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
        with tempfile.TemporaryDirectory() as tmp:
            info = export_onnx(pruned, x, f"{tmp}/p.onnx")
            row["onnx_ok"] = check_onnx(pruned, x, f"{tmp}/p.onnx").ok
            row["exporter"] = info.exporter
    except BudgetError as exc:
        row["cut"], row["budget"] = None, " ".join(str(exc).split())[:160]
    row["largest_cut"] = largest_cut(model, x)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | px | traced (leaves) | specialisations | analyze s | prunable/groups | "
            "invariant f64 | one-shot 0.4 cut | ORT == torch | largest cut | other frozen |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | FAIL: {r['error'][:80]} |" + " |" * 8)
            continue
        leaves = "yes (0)" if not r["leaves"] else f"{len(r['leaves'])} leaves: " + "; ".join(
            f"{k}: {v[:60]}" for k, v in r["leaves"].items())
        cut = "-" if r.get("cut") is None else f"{r['cut']:.3f}"
        big = "-" if r.get("largest_cut") is None else f"{r['largest_cut']:.3f}"
        other = "; ".join(f"{k} (x{v})" for k, v in sorted(r["frozen"].items(), key=lambda kv: -kv[1])[:2])
        lines.append(f"| {r['model']} | {r['input']} | {leaves} | {r['specs']}{' (batch)' if r['static_batch'] else ''}"
                     f" | {r['analyze_s']:.2f} | {r['prunable']}/{r['groups']} | {r['invariant_rel']:.0e} | {cut} | "
                     f"{r.get('onnx_ok', '-')} | {big} | {other or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name in args.models:
        signal.alarm(LIMIT_S)
        try:
            row = check(name)
        except _Timeout:
            row = {"model": name, "error": f"over {LIMIT_S} s"}
        except Exception as exc:  # noqa: BLE001 - recorded per model
            row = {"model": name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                   "where": [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)][-3:]}
        finally:
            signal.alarm(0)
        rows.append(row)
        C.console.print(f"  {name}: {row.get('error') or 'ok'}", style="dim")
    print(markdown(rows))
    C.write_json("bench_ecosystem", {"rows": rows})


if __name__ == "__main__":
    main()
