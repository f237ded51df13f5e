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

from softprune_fx.passes.errors import SoftpruneError

from .artifacts import ONNX_REL, check_batches, check_failures, checked_batches, file_sha256, time_models
from .cli_errors import ModelError, UsageError, one_line
from .plan_io import apply_plan, input_specs, inputs_from_specs, load_plan, weights_digest
from .spec import build_model, example_inputs_for, load_module, parse_input_shape


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

    one_branch: str | None = None  # pruned.onnx may hold one branch of a leaf: never "verified"

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 verified, 3 pruned.onnx holds one branch of a leaf, 1 otherwise."""
        return 0 if self.ok else (3 if self.one_branch else 1)

    def summary(self) -> str:
        """One line: verdict, worst difference, latencies."""
        if not self.ok:
            return f"verify FAILED for {self.dir}: " + "; ".join(self.failed)
        lat = ""
        if self.latency_ms_after is not None:
            before = f"{self.latency_ms_before:.3f} ms -> " if self.latency_ms_before is not None else ""
            lat = f"; ORT latency {before}{self.latency_ms_after:.3f} ms"
        from .cli_prune import kinds_text

        return (f"verified {self.dir}: ONNX Runtime == torch on {kinds_text(checked_batches(self.checks))} "
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


def integrity_failures(folder: Path, report: dict) -> list[str]:
    """One line per file that differs from what ``prune`` wrote: plan.json (its digest, kept vs
    dropped), state_dict.pt (the weights digest plan.json was sealed with), pruned.onnx and
    pruned.pt (their sha256 in report.json)."""
    try:
        plan = load_plan(folder / "plan.json")
    except SoftpruneError as exc:
        return [f"plan.json: {one_line(exc).split(': ', 1)[-1]}"]
    if "digest" not in plan or "weights_sha256" not in plan:
        return ["plan.json: it has no digest (edited, or written by an older softprune-fx)"]
    failures = []
    weights = folder / "state_dict.pt"
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if weights_digest(state) != plan["weights_sha256"]:
            failures.append("state_dict.pt: its weights differ from those plan.json was sealed with "
                            "(the file was edited or replaced)")
    recorded = report.get("files_sha256", {})
    if report.get("plan_digest") not in (None, plan["digest"]):
        failures.append("plan.json: it is not the plan report.json was written with")
    for name in ("pruned.onnx", "pruned.pt"):
        if name in recorded and (folder / name).is_file() and file_sha256(folder / name) != recorded[name]:
            failures.append(f"{name}: its sha256 differs from the one report.json recorded (the file was "
                            "edited or replaced)")
    return failures


def _example(spec: str, specs: list[dict], input_shape: str | None) -> tuple:
    """The model file's own example_inputs() when they fit the plan, else random ones."""
    try:
        module = load_module(spec)
        example = example_inputs_for(module, input_shape)
        if input_specs(example) == specs:
            return tuple(example)
    except SoftpruneError:
        pass
    return inputs_from_specs(specs) or ()


def verify_artifacts(dir: str | os.PathLike, spec: str | None = None, input_shape: str | None = None, *,
                     latency: bool = True, step: Callable[[str], ContextManager] | None = None) -> VerifyResult:
    """Check DIR's files against their digests, re-create the pruned model the safe way and
    check ``pruned.onnx`` against it.

    ``spec`` defaults to the one recorded in report.json. Every kind of input of
    :func:`softprune_fx.artifacts.input_kinds` (shapes from plan.json, or ``input_shape``)
    must agree within ``1e-4 * max(1, max|ref|)`` per output. A pruned.onnx that holds one
    branch of a leaf's control flow is never verified (``exit_code`` 3). With ``latency``,
    the original model (freshly built, exported to a temporary file) and pruned.onnx are
    timed in ORT. Raises UsageError / ModelError when the directory or model cannot be loaded.
    """
    step = step or (lambda _text: contextlib.nullcontext())
    folder = Path(dir)
    report = _read_report(folder)
    spec = spec or report.get("spec")
    if not spec:
        raise UsageError(f"{folder}/report.json records no model spec: pass --spec")
    result = VerifyResult(dir=str(folder), spec=spec)
    with step("checking the digests of plan.json, state_dict.pt, pruned.onnx, pruned.pt"):
        result.failed.extend(integrity_failures(folder, report))
    if result.failed:
        return result
    plan = load_plan(folder / "plan.json")
    with step("re-creating the pruned model from plan.json and state_dict.pt"):
        pruned = rebuild(folder, spec, plan)
    onnx_path = folder / "pruned.onnx"
    if not onnx_path.is_file():
        why = report.get("onnx_error") or "the file is missing"
        result.failed.append(f"no pruned.onnx to check ({why})")
        return result
    specs = _specs_with_shape(plan, input_shape)
    example = _example(spec, specs, input_shape)
    with step("checking pruned.onnx in ONNX Runtime"):
        check = check_batches(pruned, onnx_path, specs, example, seed=1234)
    result.checks, result.max_abs_diff = check["per_batch"], check["max_abs_diff"]
    if report.get("onnx_one_branch"):
        result.one_branch = report["onnx_one_branch"]["message"]
        result.failed.append(result.one_branch)
    result.failed.extend(check_failures(check))
    result.notes.extend(c["skipped"] for c in check["per_batch"].values() if "skipped" in c)
    if latency and example and not result.failed:
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
