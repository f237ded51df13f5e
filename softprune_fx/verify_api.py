"""Re-check saved artifacts from the safe path: builder + plan.json + weights, against pruned.onnx.

Example::

    result = verify_artifacts("softprune-out")
    result.ok, result.max_abs_diff, result.latency_ms_after
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from softprune_fx.passes.errors import OnnxExportError

from .artifacts import ONNX_REL, check_batches, check_failures, checked_batches, time_models
from .cli_errors import ModelError, UsageError, one_line
from .plan_io import apply_plan, inputs_from_specs, load_plan
from .spec import build_model, parse_input_shape


@dataclass
class VerifyResult:
    """What ``verify_artifacts`` found; ``ok`` is True when every check passed."""

    dir: str
    spec: str
    ok: bool = False
    checks: dict = field(default_factory=dict)     # batch -> {"ok", "max_abs_diff", "limits"}
    max_abs_diff: float | None = None
    rel_tolerance: float = ONNX_REL
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 verified, 1 a check failed."""
        return 0 if self.ok else 1

    def summary(self) -> str:
        """One line: verdict, worst difference, latencies."""
        if not self.ok:
            return f"verify FAILED for {self.dir}: " + "; ".join(self.failed)
        lat = ""
        if self.latency_ms_after is not None:
            before = f"{self.latency_ms_before:.3f} ms -> " if self.latency_ms_before is not None else ""
            lat = f"; ORT latency {before}{self.latency_ms_after:.3f} ms"
        batches = ", ".join(checked_batches(self.checks))
        return (f"verified {self.dir}: ONNX Runtime == torch at batch {batches} "
                f"(max|diff| {self.max_abs_diff:.3g} <= {self.rel_tolerance:g} * max(1, max|ref|)){lat}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _read_report(folder: Path) -> dict:
    path = folder / "report.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a directory")
    if not path.is_file():
        raise UsageError(f"{folder} has no report.json: not a softprune-fx output directory")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON: {one_line(exc)}") from exc


def _specs_with_shape(plan: dict, input_shape: str | None) -> list[dict]:
    """The plan's input specs, or ``--input-shape`` given again (float32)."""
    if not input_shape:
        return plan.get("inputs", [])
    return [{"shape": list(s), "dtype": "float32"} for s in parse_input_shape(input_shape)]


def rebuild(folder: Path, spec: str, plan: dict) -> torch.nn.Module:
    """Fresh model from ``spec`` + plan.json + state_dict.pt (weights_only=True), in eval mode."""
    model, _ = build_model(spec)
    model.eval()
    pruned = apply_plan(model, None, plan)
    weights = folder / "state_dict.pt"
    if not weights.is_file():
        raise ModelError(f"{folder} has no state_dict.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        pruned.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - keys or shapes do not match
        raise ModelError(f"state_dict.pt does not fit the model re-created from plan.json: "
                         f"{one_line(exc, 300)}") from exc
    return pruned.eval()


def verify_artifacts(dir: str | os.PathLike, spec: str | None = None, input_shape: str | None = None, *,
                     latency: bool = True, step: Callable[[str], ContextManager] | None = None) -> VerifyResult:
    """Re-create the pruned model the safe way and check ``pruned.onnx`` against it.

    ``spec`` defaults to the one recorded in report.json. Random inputs at batch sizes 1
    and 3 (shapes otherwise from plan.json, or ``input_shape``) must agree within
    ``1e-4 * max(1, max|ref|)`` per output. With ``latency``, the original model (freshly
    built, exported to a temporary file) and pruned.onnx are timed in ORT.
    Raises UsageError / ModelError when the directory or the model cannot be loaded.
    """
    step = step or (lambda _text: contextlib.nullcontext())
    folder = Path(dir)
    report = _read_report(folder)
    spec = spec or report.get("spec")
    if not spec:
        raise UsageError(f"{folder}/report.json records no model spec: pass --spec")
    result = VerifyResult(dir=str(folder), spec=spec)
    plan = load_plan(folder / "plan.json")
    with step("re-creating the pruned model from plan.json and state_dict.pt"):
        pruned = rebuild(folder, spec, plan)
    onnx_path = folder / "pruned.onnx"
    if not onnx_path.is_file():
        why = report.get("onnx_error") or "the file is missing"
        result.failed.append(f"no pruned.onnx to check ({why})")
        return result
    specs = _specs_with_shape(plan, input_shape)
    example = inputs_from_specs(specs) or ()
    with step("checking pruned.onnx in ONNX Runtime"):
        check = check_batches(pruned, onnx_path, specs, example, seed=1234)
    result.checks, result.max_abs_diff = check["per_batch"], check["max_abs_diff"]
    result.failed.extend(check_failures(check))
    result.notes.extend(c["skipped"] for c in check["per_batch"].values() if "skipped" in c)
    if latency and example:
        _latency(result, spec, onnx_path, example, step)
    result.ok = not result.failed
    return result


def _latency(result: VerifyResult, spec: str, onnx_path: Path, inputs: tuple, step) -> None:
    """Time a fresh export of the original model against pruned.onnx."""
    original, _ = build_model(spec)
    original.eval()
    with tempfile.TemporaryDirectory(prefix="softprune-verify-") as tmp:
        try:
            fields = time_models(Path(tmp) / "original.onnx", original, onnx_path, inputs, step)
        except (OnnxExportError, RuntimeError) as exc:
            result.notes.append(f"latency not measured: {one_line(exc)}")
            return
    result.latency_ms_before = fields.get("latency_ms_before")
    result.latency_ms_after = fields.get("latency_ms_after")
    if "original_onnx_error" in fields:
        result.notes.append(f"original model did not export: {fields['original_onnx_error']}")
