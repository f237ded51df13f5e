"""Model-agnostic verification: output comparison, ONNX export and check, ORT latency.

DESIGN.md section 6. Works for any ``nn.Module`` whose positional inputs are tensors with
the batch on dim 0 and whose output is a tensor or a nested tuple/list/dict of tensors.
Outputs are compared per tensor with ``max|diff| <= rel * max(1, max|ref|)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softprune_fx.passes.errors import OnnxExportError
from softprune_fx.passes.flops import Inputs, as_inputs, eval_mode

TORCHSCRIPT_OPSET = 17
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo")


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """Flatten a model output into ``(name, tensor)`` pairs, in exporter order.

    Names join the path: ``output`` for a lone tensor, ``output_0`` for sequence items,
    the key for dict (or namedtuple) items (``p3``), both when nested (``output_1_p3``).
    Dicts keep insertion order; non-tensor leaves (None, numbers) are skipped, as the
    exporters drop them; numpy arrays become tensors.

    Example:
        >>> t = torch.zeros(1)
        >>> [n for n, _ in flatten_outputs((t, {"p3": t, "p4": [t, t]}))]
        ['output_0', 'output_1_p3', 'output_1_p4_0', 'output_1_p4_1']
        >>> [n for n, _ in flatten_outputs(t)], [n for n, _ in flatten_outputs({"p3": t})]
        (['output'], ['p3'])
    """
    found: list[tuple[list[str], torch.Tensor]] = []

    def walk(obj: Any, path: list[str]) -> None:
        if isinstance(obj, np.ndarray):
            obj = torch.from_numpy(obj)
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, [*path, str(key)])
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            for key, value in zip(obj._fields, obj):
                walk(value, [*path, key])
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, [*path, str(i)])

    walk(out, [])
    keyed = isinstance(out, Mapping) or hasattr(out, "_fields")
    named, seen = [], set()
    for path, tensor in found:
        name = re.sub(r"\W", "_", "_".join(path if keyed else ["output", *path]))
        base, k = name, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        named.append((name, tensor))
    return named


def _abs_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max|ref - got| in float64; equal values (inf, NaN pairs) count 0, other NaN inf."""
    if ref.shape != got.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    a, b = ref.detach().cpu().double(), got.detach().cpu().double()
    diff = (a - b).abs()
    diff[(a == b) | (a.isnan() & b.isnan())] = 0.0
    return float(diff.nan_to_num(nan=float("inf")).max())


def _limit(ref: torch.Tensor, rel: float) -> float:
    """rel * max(1, max|ref|) over the finite values of ``ref``."""
    finite = ref.detach().cpu().double().abs()
    finite = finite[finite.isfinite()]
    return rel * max(1.0, float(finite.max()) if finite.numel() else 0.0)


def _pairwise(ref: Any, got: Any, rel: float) -> dict[str, tuple[float, float]]:
    """Per output of ``ref`` (by its names): (max|diff|, allowed). Matched by position."""
    ref_items, got_items = flatten_outputs(ref), flatten_outputs(got)
    if len(ref_items) != len(got_items):
        return {name: (float("inf"), _limit(r, rel)) for name, r in ref_items}
    return {
        name: (_abs_diff(r, g), _limit(r, rel)) for (name, r), (_, g) in zip(ref_items, got_items)
    }


def max_abs_diff(ref: Any, got: Any) -> float:
    """Largest ``|ref - got|`` over all outputs (inf on a count or shape mismatch).

    Example:
        >>> max_abs_diff({"a": torch.ones(2)}, [torch.tensor([1.0, 1.5])])
        0.5
    """
    return compare(ref, got, 1.0)[0]


def compare(ref: Any, got: Any, rel: float) -> tuple[float, bool]:
    """``(max_abs_diff(ref, got), relative_tolerance_ok(ref, got, rel))`` in one pass.

    Example:
        >>> compare(torch.tensor([100.0, 0.0]), torch.tensor([100.02, 0.0]), 1e-4)[1]
        False
    """
    pairs = _pairwise(ref, got, rel).values()
    return max((d for d, _ in pairs), default=0.0), all(d <= allowed for d, allowed in pairs)


def relative_tolerance_ok(ref: Any, got: Any, rel: float) -> bool:
    """True iff every output satisfies ``max|diff| <= rel * max(1, max|ref|)``.

    Example:
        >>> ref = torch.tensor([100.0, 0.0])
        >>> relative_tolerance_ok(ref, ref + 0.009, 1e-4), relative_tolerance_ok(ref, ref + 0.02, 1e-4)
        (True, False)
    """
    return compare(ref, got, rel)[1]


@dataclass
class ExportInfo:
    """Result of :func:`export_onnx`: which exporter wrote ``path``, and how fast."""

    exporter: str  # "torchscript" or "dynamo"
    output_names: list[str]
    input_names: list[str]
    seconds: float
    path: str
    static_batch: bool = False  # the batch axis is fixed at the example's size


def onnx_batch_size(path: str | os.PathLike) -> int | None:
    """The fixed batch size of the first input of an ONNX file, None when the axis is dynamic."""
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    dims = inputs[0].type.tensor_type.shape.dim if inputs else ()
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def _input_names(n: int) -> list[str]:
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of the most specific exception in the chain, ANSI-free."""
    root = exc.__cause__ or exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(root).__name__}: {first[:300]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter noise: warnings, torch.onnx logging, stdout (also C++ prints) and
    Python's stderr (the exporters' messages reach the caller in the exception)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreter, closed stdout): nothing to mute
        saved_fd = None
    else:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints failing code there
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _batch_of_two(inputs: tuple) -> tuple:
    """torch.export specialises a dimension of size 1, so a batch-1 example can give the
    dynamo exporter a fixed batch: it gets the example twice along the batch axis."""
    return tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t
                 for t in inputs)


def batch_specialised(model: nn.Module) -> bool:
    """True when ``model`` is a GraphModule whose trace specialised on the batch size."""
    meta = getattr(model, "meta", None)
    return isinstance(meta, dict) and bool(meta.get("static_batch", False))


def _attempts(n_inputs: int, names: list[str], static_batch: bool) -> list[tuple[str, dict]]:
    """Both exporters' arguments: a dynamic batch axis on every input and output, or none."""
    ts = dict(dynamo=False, opset_version=TORCHSCRIPT_OPSET)
    dyn = dict(dynamo=True, external_data=False, verbose=False)
    if not static_batch:
        batch = torch.export.Dim("batch")
        ts["dynamic_axes"] = {n: {0: "batch"} for n in names}
        dyn["dynamic_shapes"] = tuple({0: batch} for _ in range(n_inputs))
    return [("torchscript", ts), ("dynamo", dyn)]


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike,
                exporters: tuple[str, ...] = ("torchscript", "dynamo"), *,
                static_batch: bool | None = None) -> ExportInfo:
    """Export ``model`` (eval mode) to a self-contained ONNX file with a dynamic batch axis.

    ``static_batch=True`` fixes the batch axis at the example's size instead: a trace that
    specialised on the batch size (``gm.meta["static_batch"]``) holds that batch's branch only,
    so a dynamic axis would promise batches the graph is wrong for. ``None`` reads it from
    ``model.meta`` (an analysis's GraphModule; a pruned one is told by its caller).

    Tries the TorchScript exporter (fast, opset 17), then ``dynamo=True`` with
    ``external_data=False``. Writes a temporary file beside ``path`` and renames it, so a
    failure leaves no new file (an existing ``path`` is left as it was) and raises
    :class:`OnnxExportError` with both exporters' messages on one line.

    Example:
        >>> info = export_onnx(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), "/tmp/c.onnx")
        >>> info.exporter, info.output_names
        ('torchscript', ['output'])
    """
    inputs, path = as_inputs(example_inputs), Path(path)
    with eval_mode(model):
        output_names = [name for name, _ in flatten_outputs(model(*inputs))]
    input_names = _input_names(len(inputs))
    if static_batch is None:
        static_batch = batch_specialised(model)
    attempts = _attempts(len(inputs), input_names + output_names, static_batch)
    attempts = [a for a in attempts if a[0] in exporters]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    errors = []
    try:
        for exporter, kwargs in attempts:
            start = time.perf_counter()
            args = inputs if exporter == "torchscript" or static_batch else _batch_of_two(inputs)
            try:
                with eval_mode(model), _quiet():
                    torch.onnx.export(model, args, tmp, input_names=input_names,
                                      output_names=output_names, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any exporter failure means "try next"
                errors.append(f"{exporter}: {_one_line(exc)}")
                continue
            seconds = time.perf_counter() - start
            os.replace(tmp, path)
            return ExportInfo(exporter, output_names, input_names, seconds, str(path), static_batch)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise OnnxExportError(f"ONNX export of {type(model).__name__} failed: " + " | ".join(errors))


def _session(path: str | os.PathLike, spinning: bool = True) -> Any:
    """A CPU onnxruntime InferenceSession; ``spinning=False`` stops idle thread spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    """Map inputs to session input names: by our names (unused inputs dropped) or position."""
    arrays = [np.ascontiguousarray(t.detach().cpu().numpy()) for t in as_inputs(inputs)]
    wanted = [i.name for i in session.get_inputs()]
    ours = dict(zip(_input_names(len(arrays)), arrays))
    if all(name in ours for name in wanted):
        return {name: ours[name] for name in wanted}
    if len(wanted) != len(arrays):
        raise ValueError(f"ONNX model takes inputs {wanted}, got {len(arrays)} tensors")
    return dict(zip(wanted, arrays))


def run_onnx(path: str | os.PathLike, inputs: Inputs) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime (CPU) and return its outputs in order.

    Example:
        >>> export_onnx(nn.Linear(4, 2), torch.randn(1, 4), "/tmp/l.onnx").exporter
        'torchscript'
        >>> run_onnx("/tmp/l.onnx", torch.randn(3, 4))[0].shape
        (3, 2)
    """
    session = _session(path)
    return session.run(None, _feed(session, inputs))


@dataclass
class OnnxCheck:
    """Result of :func:`check_onnx`: per-output max|diff|, allowed diff, and verdict."""

    max_abs_diff: dict[str, float]
    ok: bool
    tolerance: float  # rel: allowed diff is rel * max(1, max|ref|) per output
    limits: dict[str, float] = field(default_factory=dict)


def check_onnx(model: nn.Module, inputs: Inputs, path: str | os.PathLike,
               rel: float = 1e-4) -> OnnxCheck:
    """Compare the ONNX file at ``path`` in onnxruntime against ``model`` in eval mode.

    Example:
        >>> m, x = nn.Linear(4, 2), torch.randn(1, 4)
        >>> _ = export_onnx(m, x, "/tmp/l.onnx")
        >>> check_onnx(m, torch.randn(3, 4), "/tmp/l.onnx").ok
        True
    """
    with eval_mode(model):
        ref = model(*as_inputs(inputs))
    pairs = _pairwise(ref, run_onnx(path, inputs), rel)
    return OnnxCheck(
        max_abs_diff={name: d for name, (d, _) in pairs.items()},
        ok=all(d <= allowed for d, allowed in pairs.values()),
        tolerance=rel,
        limits={name: allowed for name, (_, allowed) in pairs.items()},
    )


@dataclass
class LatencyStats:
    """Latency of one ONNX file in milliseconds: median and the p10..p90 spread."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def ort_latency(paths: dict[str, str], inputs: Inputs, warmup: int = 5,
                repeats: int = 30) -> dict[str, LatencyStats]:
    """Time several ONNX files interleaved (round-robin each repeat) in onnxruntime CPU.

    Each session has ``session.intra_op.allow_spinning = 0`` so idle sessions do not steal
    cores from the one being timed; the round-robin start rotates each repeat so no file
    always runs first.

    Example (``x`` a batch both files accept)::

        stats = ort_latency({"orig": "orig.onnx", "pruned": "pruned.onnx"}, x)
        speedup = stats["orig"].median_ms / stats["pruned"].median_ms
    """
    if not paths or repeats < 1:
        raise ValueError("ort_latency needs at least one file and one repeat")
    sessions = {name: _session(p, spinning=False) for name, p in paths.items()}
    feeds = {name: _feed(s, inputs) for name, s in sessions.items()}
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: LatencyStats(*(float(np.percentile(t, q)) for q in (50, 10, 90)), len(t))
        for name, t in times.items()
    }


# leaves with Python control flow: scripted for export (onnx_leaves.py)
from .onnx_leaves import LeafExport, export_with_leaves, script_leaves  # noqa: E402,F401
