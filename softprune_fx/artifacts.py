"""The output directory of ``softprune-fx prune``, written atomically.

Everything is written into a temporary directory beside DIR and renamed into place at
the end, so DIR is either the complete new result or untouched:

    pruned.pt        the whole pruned GraphModule (torch.load(..., weights_only=False))
    state_dict.pt    its weights (torch.load(..., weights_only=True))
    plan.json        kept channels per group, input specs, graph fingerprint (apply_plan)
    pruned.onnx      self-contained, dynamic batch axis (static where the trace read the batch size)
    report.json      figures, checks, and what failed
    widths.png       channels per group before/after (skipped without matplotlib)

Latency repeats can be lowered with SOFTPRUNE_FX_LATENCY_REPEATS / _WARMUP (tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from softprune_fx.passes.errors import OnnxExportError
from softprune_fx.passes.flops import eval_mode
from softprune_fx.onnx_check import check_onnx, export_onnx, export_with_leaves, onnx_batch_size, ort_latency

from .cli_errors import UsageError, one_line
from .plan_io import inputs_from_specs, save_plan, seal_plan
from .widths_plot import plot_widths

ONNX_REL = 1e-4
Step = Callable[[str], ContextManager]


def latency_settings() -> tuple[int, int]:
    """(warmup, repeats) for ORT timing, from the environment (defaults 5, 30)."""
    warmup = int(os.environ.get("SOFTPRUNE_FX_LATENCY_WARMUP", "5"))
    repeats = int(os.environ.get("SOFTPRUNE_FX_LATENCY_REPEATS", "30"))
    return max(0, warmup), max(1, repeats)


def check_out_dir(out: str | os.PathLike, force: bool, announce: bool = False) -> Path:
    """Refuse (UsageError) the current directory or a parent of it, an existing non-directory,
    or a non-empty DIR without ``force``. With ``force`` and ``announce``, one line on stderr
    lists what will be replaced."""
    out = Path(out)
    resolved, cwd = out.expanduser().resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        what = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise UsageError(f"--out {out} is {what}: DIR is replaced as a whole, so choose a new "
                         "subdirectory (e.g. --out softprune-out)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise UsageError(f"output directory {out} exists and is not empty: pass --force to replace it, "
                         "or choose another --out")
    if entries and announce:
        shown = ", ".join(entries[:8]) + (f" (+{len(entries) - 8} more)" if len(entries) > 8 else "")
        print(f"softprune-fx: note: --force: {out} will be replaced at the end; it holds "
              f"{len(entries)} entries: {shown}", file=sys.stderr, flush=True)
    return out


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty, or any with ``force``) is replaced."""
    check_out_dir(out, force)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` when the block succeeds.

    On any exception the temporary directory is removed and ``out`` is left as it was.
    """
    out = check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, _umask_mode())
        yield tmp
        _commit(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_models(folder: Path, pruned: nn.Module, plan: dict) -> dict:
    """pruned.pt (whole module), state_dict.pt (weights only) and plan.json, sealed with the
    digest of those weights; returns the sealed plan."""
    torch.save(pruned, folder / "pruned.pt")  # api.plain() already dropped string annotations
    state = pruned.state_dict()
    torch.save(state, folder / "state_dict.pt")
    plan = seal_plan(plan, state)
    save_plan(plan, folder / "plan.json")
    return plan


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ONE_BRANCH = ("pruned.onnx {holds} one branch of leaf {leaf!r}: the exporter ran its Python ({reason}) and "
              "baked in the branches the example took, and neither scripting it ({why}) nor torch.export "
              "could keep its control flow; the file is written for inspection only")


def _runs_in_torch(model: nn.Module, inputs: tuple) -> str | None:
    """None when ``model`` runs on ``inputs`` in eval mode, else torch's error in one line."""
    try:
        with eval_mode(model):
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {one_line(exc, 300)}"
    return None


def input_kinds(specs: list[dict], example_inputs: tuple, seed: int = 0) -> list[tuple[str, tuple | None]]:
    """``(name, inputs)`` to compare on: random normal at batch 1, 3 and the recorded one,
    normal x5, constants +5 and -5 (the other side of a data-dependent branch), the example."""
    recorded = specs[0]["shape"][0] if specs and specs[0].get("shape") else None
    kinds: list[tuple[str, tuple | None]] = []
    for i, batch in enumerate(sorted({1, 3} | ({recorded} if recorded else set()))):
        kinds.append((str(batch), inputs_from_specs(specs, batch=batch, seed=seed + i)))
    base = inputs_from_specs(specs, seed=seed + 7)
    if base is not None:
        floats = lambda f: tuple(f(t) if t.is_floating_point() else t for t in base)  # noqa: E731
        kinds += [("normal x5", floats(lambda t: t * 5)), ("constant +5", floats(lambda t: torch.full_like(t, 5.0))),
                  ("constant -5", floats(lambda t: torch.full_like(t, -5.0)))]
    if example_inputs:
        kinds.append(("example", tuple(example_inputs)))
    return kinds


def check_batches(model: nn.Module, onnx_path: Path, specs: list[dict], example_inputs: tuple,
                  seed: int = 0) -> dict:
    """ORT vs torch on several kinds of input (:func:`input_kinds`).

    Returns ``{"ok", "max_abs_diff", "per_batch", "rel_tolerance"}`` (``per_batch`` keyed by
    kind: batch sizes, "normal x5", "constant +5", "constant -5", "example"). A batch size
    other than the recorded one at which torch itself cannot run the model (a batch fixed
    in its code) is skipped with a note; ORT raising or differing is a failure. A file with a
    static batch axis (the trace specialised on the batch size) is checked at that batch only;
    the other batch sizes are skipped with a note saying so.
    """
    recorded = specs[0]["shape"][0] if specs and specs[0].get("shape") else None
    fixed = onnx_batch_size(onnx_path)
    per_batch, worst, ok = {}, 0.0, True
    for name, inputs in input_kinds(specs, example_inputs, seed):
        if inputs is None:  # non-tensor inputs: only the example itself can be fed
            continue
        if fixed and name.isdigit() and int(name) != fixed:
            per_batch[name] = {"ok": True, "skipped": f"pruned.onnx has a static batch axis of {fixed} (the trace "
                                                      f"specialised on the batch size): checked at batch {fixed} only"}
            continue
        torch_error = _runs_in_torch(model, inputs)
        if torch_error and name.isdigit() and int(name) != recorded:
            per_batch[name] = {"ok": True, "skipped": f"torch cannot run batch {name}: {torch_error}"}
            continue
        try:
            check = check_onnx(model, inputs, onnx_path, rel=ONNX_REL)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed check
            per_batch[name] = {"ok": False, "error": f"{type(exc).__name__}: {one_line(exc, 300)}"}
            ok = False
            continue
        per_batch[name] = {"ok": check.ok, "max_abs_diff": check.max_abs_diff, "limits": check.limits}
        worst = max([worst, *check.max_abs_diff.values()])
        ok = ok and check.ok
    return {"ok": ok, "max_abs_diff": worst, "per_batch": per_batch, "rel_tolerance": ONNX_REL, "static_batch": fixed}


def checked_batches(per_batch: dict) -> list[str]:
    """The batch sizes of a check's ``per_batch`` that were compared (not skipped)."""
    return [b for b, c in per_batch.items() if "skipped" not in c]


def check_failures(check: dict) -> list[str]:
    """One line per failed batch of a :func:`check_batches` result."""
    lines = []
    for batch, c in check["per_batch"].items():
        if c.get("error"):
            lines.append(f"input {batch}: the ONNX Runtime check could not run: {c['error']}")
        elif not c["ok"]:
            lines.append(f"input {batch}: ONNX Runtime differs from torch: max|diff| "
                         f"{max(c['max_abs_diff'].values()):.3g} above {ONNX_REL:g} * max(1, max|ref|)")
    return lines


def onnx_stage(folder: Path, original: nn.Module, pruned: nn.Module, inputs: tuple, specs: list[dict],
               step: Step, leaves: dict | None = None, static_batch: bool = False) -> dict:
    """Export both models, check the pruned one in ORT, time both; report fields.

    ``original.onnx`` is only used for timing and is removed; a failed pruned export
    sets ``onnx_error`` (no check, no latency).
    """
    fields: dict[str, Any] = {"onnx_exporter": None, "onnx_error": None, "max_abs_diff_onnx": None,
                              "latency_ms_before": None, "latency_ms_after": None}
    try:
        with step("exporting the pruned model to ONNX"):
            leaf_export = export_with_leaves(pruned, inputs, folder / "pruned.onnx", list(leaves or {}),
                                             static_batch=static_batch)
    except OnnxExportError as exc:
        fields["onnx_error"] = one_line(exc)
        return fields
    info = leaf_export.info
    fields["onnx_scripted_leaves"] = leaf_export.scripted
    if leaf_export.one_branch:
        branch = dict(leaf_export.one_branch)
        branch["reason"] = (leaves or {}).get(branch["leaf"], "")
        data_dependent = "tensor contents" in branch["reason"] or "DataDependent" in branch["reason"]
        branch["message"] = ONE_BRANCH.format(holds="holds" if data_dependent else "may hold", leaf=branch["leaf"],
                                              reason=branch["reason"] or "leaf", why=one_line(branch["why"], 200))
        fields["onnx_one_branch"] = branch
    fields["onnx_exporter"] = info.exporter
    fields["onnx_export_seconds"] = round(info.seconds, 3)
    fields["onnx_output_names"] = info.output_names
    with step("checking pruned.onnx in ONNX Runtime"):
        check = check_batches(pruned, folder / "pruned.onnx", specs, inputs)
    fields["onnx_check"] = check
    fields["max_abs_diff_onnx"] = check["max_abs_diff"]  # worst over the batches that ran
    try:
        fields.update(time_models(folder / "original.onnx", original, folder / "pruned.onnx", inputs, step))
    except Exception as exc:  # noqa: BLE001 - timing is a figure, not a check
        fields["latency_error"] = f"{type(exc).__name__}: {one_line(exc, 300)}"
    return fields


def _ort_latency(paths: dict, inputs: tuple, warmup: int, repeats: int) -> dict:
    """``ort_latency``, or with ``$SOFTPRUNE_FX_ORT_THREADS`` (``--ort-threads``) the latency
    model's timer pinned to that many intra-op threads (same interleaving, spinning off)."""
    threads = int(os.environ.get("SOFTPRUNE_FX_ORT_THREADS") or 0)
    if not threads:
        return ort_latency(paths, inputs, warmup=warmup, repeats=repeats)
    from .latency import OrtTimer
    from .onnx_check import LatencyStats, _feed
    feeds: dict = {}
    out = OrtTimer(threads).files(paths, lambda s: feeds.setdefault(id(s), _feed(s, inputs)), warmup, repeats)
    return {name: LatencyStats(med, p10, p90, repeats) for name, (med, p10, p90) in out.items()}


def time_models(original_path: Path, original: nn.Module, pruned_path: Path, inputs: tuple,
                step: Step) -> dict:
    """Export ``original`` to ``original_path`` (removed afterwards) and time both files in ORT."""
    warmup, repeats = latency_settings()
    fields: dict[str, Any] = {"latency_warmup": warmup, "latency_repeats": repeats}
    paths = {"after": str(pruned_path)}
    try:
        with step("exporting the original model to ONNX"):
            export_onnx(original, inputs, original_path)
        paths["before"] = str(original_path)
    except OnnxExportError as exc:
        fields["original_onnx_error"] = one_line(exc)
    try:
        with step(f"timing in ONNX Runtime ({repeats} runs each, interleaved)"):
            stats = _ort_latency(paths, inputs, warmup, repeats)
    finally:
        if original_path.exists():
            original_path.unlink()
    for name, s in stats.items():
        fields[f"latency_ms_{name}"] = round(s.median_ms, 4)
        fields[f"latency_spread_ms_{name}"] = [round(s.p10_ms, 4), round(s.p90_ms, 4)]
    return fields


def group_rows(result: Any) -> list[dict]:
    """``[{"id", "kinds", "width_before", "width_after"}]`` from a PruneResult."""
    kinds = getattr(result, "kinds", {}) or {}
    return [{"id": gid, "kinds": sorted(kinds.get(gid, ())), "width_before": int(before),
             "width_after": int(after)} for gid, (before, after) in result.widths.items()]


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars as plain numbers; sets as sorted lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def base_report(result: Any, meta: dict) -> dict:
    """The figures every report has, from a PruneResult and the run's metadata."""
    report = dict(meta)
    for key in ("flops_before", "flops_after", "params_before", "params_after", "target_ratio",
                "achieved_ratio"):
        report[key] = getattr(result, key)
    report["max_abs_diff_masked"] = float(getattr(result, "max_abs_diff", float("nan")))
    report["rounding_dropped"] = list(getattr(result, "rounding_dropped", []) or [])
    report["inexact"] = list(getattr(result, "inexact", []) or [])
    report["groups"] = group_rows(result)
    for key in ("training_cut", "training_shortfall"):  # SCP runs: what training itself reached
        if getattr(result, key, None) is not None:
            report[key] = float(getattr(result, key))
    for key in ("target", "ort_threads", "flops_ratio", "ort_ms_before", "ort_ms_after", "ort_pred_ms_before",
                "ort_pred_ms_after", "ort_pred_error", "ort_pred_error_rel", "ort_pred_cut", "ort_pred_cut_tables",
                "ort_pred_fixed_share", "latency_rounds"):
        if getattr(result, key, None) not in (None, []):  # --target latency (softprune_fx/latency.py)
            report[key] = getattr(result, key)
    thresholds = getattr(result, "thresholds", None) or {}
    for row in report["groups"]:
        if row["id"] in thresholds:
            row["dead_thresholds"] = [float(t) for t in thresholds[row["id"]]]
    return report


def write_artifacts(out: str | os.PathLike, *, original: nn.Module, pruned: nn.Module, inputs: tuple,
                    result: Any, plan: dict, meta: dict, force: bool = False,
                    step: Step | None = None, leaves: dict | None = None) -> dict:
    """Write DIR atomically and return the report (also in DIR/report.json).

    ``leaves`` maps the untraced leaf modules of the pruned graph to why they were not
    traced; they are scripted for export (:func:`export_with_leaves`).
    ``report["status"]`` is "ok", "onnx_mismatch" (ORT differs from torch beyond
    1e-4 * max(1, max|ref|)), "onnx_one_branch" (pruned.onnx may hold one branch of a
    leaf's control flow) or "onnx_export_failed"; ``report["failed"]`` says what failed.
    """
    step = step or (lambda _text: contextlib.nullcontext())
    pruned.eval()
    report = base_report(result, meta)
    analysis = getattr(result, "analysis", None)  # its trace's specialisations, with source lines
    report["specialisations"] = list(getattr(analysis, "specialisations", None) or [])
    report["static_batch"] = any(s.get("batch") for s in report["specialisations"])
    seconds: dict[str, float] = {}
    with staged_dir(out, force) as tmp:
        start = time.perf_counter()
        with step("saving pruned.pt, state_dict.pt, plan.json"):
            plan = save_models(tmp, pruned, plan)
        report["plan_digest"] = plan["digest"]
        seconds["save"] = time.perf_counter() - start
        start = time.perf_counter()
        report["untraced_leaves"] = dict(leaves or {})
        report.update(onnx_stage(tmp, original, pruned, inputs, plan.get("inputs", []), step, leaves,
                                 report["static_batch"]))
        seconds["onnx"] = time.perf_counter() - start
        report["widths_png"] = plot_widths(tmp / "widths.png", report["groups"])
        report["failed"] = []
        if report["onnx_error"]:
            report["status"] = "onnx_export_failed"
            report["failed"].append(f"ONNX export failed with both exporters: {report['onnx_error']}")
        elif report.get("onnx_one_branch"):
            report["status"] = "onnx_one_branch"
            report["failed"].append(report["onnx_one_branch"]["message"])
            report["failed"].extend(check_failures(report["onnx_check"]))
        elif not report["onnx_check"]["ok"]:
            report["status"] = "onnx_mismatch"
            report["failed"].extend(check_failures(report["onnx_check"]))
        else:
            report["status"] = "ok"
        report["files_sha256"] = {name: file_sha256(tmp / name) for name in ("pruned.pt", "state_dict.pt",
                                                                              "plan.json", "pruned.onnx")
                                  if (tmp / name).is_file()}
        report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    return report
