"""``plan.json``: the safe way back to a pruned model without unpickling code.

A plan records, for every channel group of the analysed model, the channel indices
kept and dropped, plus the example-input specs (shapes, dtypes), the analysis options
and a fingerprint of the traced graph. ``apply_plan`` re-creates the pruned architecture
from a freshly built model and refuses a model whose graph does not match:

    plan = make_plan(model, inputs, result.drop, result)       # at pruning time
    pruned = apply_plan(build(), None, plan)                   # later, anywhere
    pruned.load_state_dict(torch.load("state_dict.pt", weights_only=True))
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from softprune_fx.passes.capture import as_input_tuple
from softprune_fx.passes.errors import SoftpruneError

from .api import analyze

PLAN_FORMAT = "softprune-fx-plan"
PLAN_VERSION = 1


def _target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A stable name for a node's target: qualified name plus class for modules."""
    if node.op == "call_module":
        return f"{node.target}:{type(gm.get_submodule(node.target)).__qualname__}"
    if node.op == "call_function":
        try:
            return _get_qualified_name(node.target)
        except Exception:  # noqa: BLE001 - odd callables: fall back to their repr
            return getattr(node.target, "__qualname__", repr(node.target))
    return str(node.target)


def _shape_of(value: Any) -> Any:
    """JSON-able description of a node's meta value: shapes and dtypes, recursively."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype).replace("torch.", "")]
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [_shape_of(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _shape_of(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """sha256 over each node's op, target (module class for call_module), inputs and output shape.

    ``gm`` is a captured graph (``analyze(...).gm``) whose nodes carry ``meta["val"]``.
    """
    digest = hashlib.sha256()
    index: dict[fx.Node, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        record = [node.op, _target_name(gm, node), [index[a] for a in node.all_input_nodes],
                  _shape_of(node.meta.get("val"))]
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def input_specs(example_inputs: Any) -> list[dict]:
    """``[{"shape": [...], "dtype": "float32"}]`` per example input (``{"type": ...}`` for non-tensors)."""
    specs = []
    for x in as_input_tuple(example_inputs):
        if isinstance(x, torch.Tensor):
            specs.append({"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")})
        else:
            specs.append({"type": type(x).__name__})
    return specs


def inputs_from_specs(specs: list[dict], batch: int | None = None, seed: int = 0) -> tuple | None:
    """Random tensors matching ``specs`` (batch dim replaced by ``batch``); None if not all tensors."""
    if not specs or any("shape" not in s for s in specs):
        return None
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape = list(s["shape"])
        if batch is not None and shape:
            shape[0] = batch
        dtype = getattr(torch, s["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _options(frozen: Iterable = (), allow_inexact: bool = False, leaf_modules: Iterable = ()) -> dict:
    """Analysis options as JSON; leaf classes are recorded for information only."""
    leaves = list(leaf_modules)
    return {"frozen": [str(f) for f in frozen], "allow_inexact": bool(allow_inexact),
            "leaf_modules": [m for m in leaves if isinstance(m, str)],
            "leaf_classes": [f"{m.__module__}.{m.__qualname__}" for m in leaves if isinstance(m, type)]}


def make_plan(model: torch.nn.Module, example_inputs: Any, drop: dict, result: Any = None, *,
              frozen: Iterable = (), allow_inexact: bool = False, leaf_modules: Iterable = (),
              analysis=None) -> dict:
    """The plan for pruning ``model`` by the legal ``drop`` (checked; raises IllegalDropError).

    ``result`` (a PruneResult, optional) adds its FLOPs and parameter figures. The analysis
    options must be the ones the drop was computed with. ``analysis`` (default: the
    result's) is the analysis of ``model`` to use instead of tracing it again.
    """
    from . import __version__

    cg = analysis if analysis is not None else getattr(result, "analysis", None)
    if cg is None:
        cg = analyze(model, example_inputs, frozen=frozen, allow_inexact=allow_inexact, leaf_modules=leaf_modules)
    cg.plan(drop)
    groups = {}
    for g in cg.groups:
        dropped = sorted({int(i) for i in (drop or {}).get(g.id, ())})
        gone = set(dropped)
        groups[g.id] = {"width": g.width, "kept": [i for i in range(g.width) if i not in gone],
                        "dropped": dropped}
    plan = {
        "format": PLAN_FORMAT, "format_version": PLAN_VERSION,
        "softprune_version": __version__, "torch_version": torch.__version__,
        "model_class": type(model).__qualname__, "training": bool(model.training),
        "inputs": input_specs(example_inputs),
        "options": _options(frozen, allow_inexact, leaf_modules),
        "fingerprint": graph_fingerprint(cg.gm),
        "groups": groups,
    }
    if result is not None:
        plan["result"] = {k: getattr(result, k) for k in (
            "flops_before", "flops_after", "params_before", "params_after", "target_ratio",
            "achieved_ratio") if hasattr(result, k)}
    return plan


def save_plan(plan: dict, path: str | os.PathLike) -> None:
    """Write a plan as indented JSON."""
    Path(path).write_text(json.dumps(plan, indent=1) + "\n")


def weights_digest(state_dict: dict) -> str:
    """sha256 over every entry of a state dict: name, dtype, shape and raw bytes, by name."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plan_digest(plan: dict) -> str:
    """sha256 of the plan's canonical JSON without its own ``digest`` entry."""
    body = {k: v for k, v in plan.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal_plan(plan: dict, state_dict: dict) -> dict:
    """The plan with ``weights_sha256`` (of the pruned weights it belongs to) and ``digest``."""
    sealed = {k: v for k, v in plan.items() if k != "digest"}
    sealed["weights_sha256"] = weights_digest(state_dict)
    sealed["digest"] = plan_digest(sealed)
    return sealed


def check_groups_consistent(plan: dict, where: str = "plan") -> None:
    """Refuse a plan whose kept and dropped channels of a group overlap or miss a channel."""
    for gid, g in plan["groups"].items():
        width, kept, dropped = g.get("width"), g.get("kept"), g.get("dropped")
        ok = (isinstance(width, int) and isinstance(kept, list) and isinstance(dropped, list)
              and all(isinstance(i, int) for i in kept + dropped)
              and sorted(kept + dropped) == list(range(width)) and kept == sorted(kept)
              and dropped == sorted(dropped))
        if not ok:
            raise SoftpruneError(f"{where}: group {gid!r}: kept and dropped disagree (they must split "
                                 f"0..{width - 1 if isinstance(width, int) else '?'} without overlap); "
                                 "the plan was edited or is damaged")


def load_plan(plan: dict | str | os.PathLike) -> dict:
    """A plan dict from a dict or a JSON file; checks its format, its digest (when it has
    one) and that kept and dropped agree in every group."""
    where = "plan" if isinstance(plan, dict) else str(plan)
    if not isinstance(plan, dict):
        try:
            plan = json.loads(Path(plan).read_text())
        except (OSError, ValueError) as exc:
            raise SoftpruneError(f"cannot read plan {plan}: {exc}") from exc
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("groups"), dict):
        raise SoftpruneError("not a softprune-fx plan (no 'format': 'softprune-fx-plan' with groups)")
    if plan.get("format_version", 0) > PLAN_VERSION:
        raise SoftpruneError(f"plan format {plan['format_version']} is newer than this softprune-fx "
                             f"understands ({PLAN_VERSION}); upgrade softprune-fx")
    if "digest" in plan and plan["digest"] != plan_digest(plan):
        raise SoftpruneError(f"{where}: its content does not match its digest: it was edited after it was "
                             "written (restore it, or delete 'digest' to use an edited plan on purpose)")
    check_groups_consistent(plan, where)
    return plan


def _analysis_inputs(example_inputs: Any, plan: dict) -> tuple:
    """Inputs of exactly the recorded shapes (the fingerprint includes them)."""
    recorded = inputs_from_specs(plan.get("inputs", []))
    if example_inputs is None:
        if recorded is None:
            raise SoftpruneError("the plan's inputs are not all tensors: pass example_inputs to apply_plan")
        return recorded
    given = as_input_tuple(example_inputs)
    specs = input_specs(given)
    if recorded is not None and specs != plan["inputs"]:
        same_but_batch = len(specs) == len(plan["inputs"]) and all(
            a.get("dtype") == b.get("dtype") and a.get("shape", [])[1:] == b.get("shape", [])[1:]
            for a, b in zip(specs, plan["inputs"]))
        if not same_but_batch:
            raise SoftpruneError(f"example inputs {specs} do not match the plan's {plan['inputs']}")
        return recorded
    return given


def _check_groups(cg, plan: dict, model_class: str) -> None:
    """Name the first group that differs between the model and the plan."""
    ours = {g.id: g.width for g in cg.groups}
    theirs = {gid: g["width"] for gid, g in plan["groups"].items()}
    for gid, width in theirs.items():
        if gid not in ours:
            raise SoftpruneError(f"{model_class} does not match the plan: it has no channel group {gid!r}")
        if ours[gid] != width:
            raise SoftpruneError(f"{model_class} does not match the plan: group {gid!r} has width "
                                 f"{ours[gid]}, the plan says {width}")
    extra = sorted(set(ours) - set(theirs))
    if extra:
        raise SoftpruneError(f"{model_class} does not match the plan: group {extra[0]!r} is not in the plan")


def apply_plan(model: torch.nn.Module, example_inputs: Any, plan: dict | str | os.PathLike,
               **options) -> fx.GraphModule:
    """Re-create the pruned architecture from a freshly built ``model`` and a plan.

    ``example_inputs`` may be None when the plan recorded tensor inputs (their batch size
    may differ). ``options`` override the recorded analysis options (pass leaf_modules
    again when they were given as classes: the plan lists them under leaf_classes).
    Raises SoftpruneError when the model's traced graph differs from the one the plan was
    made on. The model itself is not changed.
    """
    plan = load_plan(plan)
    recorded = dict(plan.get("options", {}))
    recorded.pop("leaf_classes", None)
    opts = {**recorded, **options}
    inputs = _analysis_inputs(example_inputs, plan)
    name = f"{type(model).__qualname__} (the plan was made on {plan.get('model_class', '?')})"
    cg = analyze(model, inputs, **opts)
    _check_groups(cg, plan, name)
    if graph_fingerprint(cg.gm) != plan["fingerprint"]:
        mode = "train" if model.training else "eval"
        hint = "" if model.training == plan.get("training", model.training) else (
            f" (the model is in {mode} mode, the plan was made in the other: call .eval() or .train())")
        raise SoftpruneError(f"{name} does not match the plan: its traced graph differs from the one the "
                             f"plan was made on{hint}; build it with the same builder and arguments")
    drop = {gid: g["dropped"] for gid, g in plan["groups"].items() if g["dropped"]}
    return cg.prune(drop)
