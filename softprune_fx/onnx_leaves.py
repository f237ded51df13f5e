"""ONNX export of models holding untraced leaves (submodules whose Python, possibly
data-dependent control flow, runs as is in torch): scripted so an ``if`` stays an ONNX
``If``, else torch.export, else a plain export reported as holding one branch.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from softprune_fx.passes.errors import OnnxExportError
from softprune_fx.passes.flops import Inputs, as_inputs, eval_mode

from . import onnx_check as oc  # module reference: tests patch oc.export_onnx


@dataclass
class LeafExport:
    """How :func:`export_with_leaves` wrote the file: ``one_branch`` names the leaf whose
    Python control flow the file may have baked in (None when none can be)."""

    info: oc.ExportInfo
    scripted: list[str] = field(default_factory=list)
    one_branch: dict | None = None


def script_leaves(model: nn.Module, names) -> tuple[nn.Module, dict[str, str]]:
    """A deep copy of ``model`` with each named submodule replaced by ``torch.jit.script`` of
    it (so the TorchScript exporter keeps its ``if`` as an ONNX ``If``); ``{name: error}``
    for those that do not script."""
    twin, failed = copy.deepcopy(model), {}
    for name in names:
        try:
            sub = twin.get_submodule(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(sub)
        except Exception as exc:  # noqa: BLE001 - TorchScript refuses much ordinary Python
            failed[name] = oc._one_line(exc)
            continue
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, scripted)
    return twin, failed


def export_with_leaves(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike,
                       leaves=(), *, static_batch: bool | None = None) -> LeafExport:
    """Export a model whose submodules ``leaves`` were not traced (their Python, possibly
    data-dependent control flow, runs as is in torch).

    The TorchScript exporter traces through a leaf and bakes in the branch the example
    takes, so leaves are scripted first (``If`` survives). When a leaf does not script,
    the dynamo exporter is tried (torch.export refuses data-dependent branches, so a file
    it writes holds none); failing that, the plain TorchScript export is written and
    ``one_branch`` names the leaf: the file may compute one branch only. ``static_batch``
    as in :func:`~softprune_fx.onnx_check.export_onnx`, on every route.
    """
    leaves = list(leaves)
    static = oc.batch_specialised(model) if static_batch is None else static_batch
    if not leaves:
        return LeafExport(oc.export_onnx(model, example_inputs, path, static_batch=static))
    scripted, failed = script_leaves(model, leaves)
    errors = dict(failed)
    if not failed:
        try:  # the exporter's own tracer refuses script submodules; a jit.trace of the whole keeps them
            with eval_mode(scripted), oc._quiet():
                traced = torch.jit.trace(scripted, as_inputs(example_inputs), strict=False, check_trace=False)
            info = oc.export_onnx(traced, example_inputs, path, ("torchscript",), static_batch=static)
            info.exporter = "torchscript, scripted leaves"
            return LeafExport(info, scripted=leaves)
        except Exception as exc:  # noqa: BLE001 - then the other routes
            errors["(scripted export)"] = oc._one_line(exc)
    try:
        return LeafExport(oc.export_onnx(model, example_inputs, path, ("dynamo",), static_batch=static))
    except OnnxExportError as exc:
        errors["(dynamo export)"] = str(exc)
    info = oc.export_onnx(model, example_inputs, path, ("torchscript",), static_batch=static)
    leaf = next(iter(failed), leaves[0])
    return LeafExport(info, one_branch={"leaf": leaf, "why": errors.get(leaf) or "; ".join(errors.values()),
                                        "leaves": leaves})
