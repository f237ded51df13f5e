"""The contract API: analyze, masked, prune_channels.

Example::

    cg = analyze(model, x)
    drop = cg.legalize({g.id: [0] for g in cg.groups if g.prunable})
    small = prune_channels(model, x, drop)      # same function as masked(model, x, drop)
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

import torch.fx as fx
from torch import nn

from softprune_fx.passes.capture import as_input_tuple, capture
from softprune_fx.passes.flow import run_flow
from softprune_fx.passes.gcpause import without_gc
from softprune_fx.passes.groups import build_groups

from .graph import ChannelGraph


@without_gc
def analyze(model: nn.Module, example_inputs: Any, *, frozen: Iterable[str] = (),
            leaf_modules: Iterable = (), allow_inexact: bool = False) -> ChannelGraph:
    """Trace ``model`` (read only, not copied) and find its channel groups.

    ``frozen`` names module prefixes or group ids to leave alone; ``leaf_modules`` are
    module classes or names not to trace into; ``allow_inexact`` lets groups through ops
    that mix statistics across channels be pruned (not exact: the report says so).
    """
    inputs = as_input_tuple(example_inputs)
    gm = capture(model, inputs, leaf_modules)
    _warn_static_batch(gm, inputs)
    flow = run_flow(gm, allow_inexact=allow_inexact)
    options = dict(frozen=tuple(frozen), leaf_modules=tuple(leaf_modules), allow_inexact=allow_inexact)
    return ChannelGraph(gm, flow, build_groups(flow, tuple(frozen)), inputs, options)


def _warn_static_batch(gm: fx.GraphModule, inputs: tuple) -> None:
    """Say so when Python in the forward branched on the batch size: the traced (and so the
    pruned) graph holds the branch of this batch size only."""
    if not gm.meta.get("static_batch"):
        return
    where = next((f"{s.get('where')}: {s.get('code') or s.get('expr')}" for s in gm.meta.get("specialisations", ())
                  if s.get("batch")), "?")
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), "?")
    warnings.warn(f"the trace specialised on the batch size ({where}): the pruned model holds the branch "
                  f"taken at batch {batch} and is valid for that batch size only", stacklevel=3)


def plain(gm: fx.GraphModule) -> fx.GraphModule:
    """Strip softprune references so the module pickles and loads with plain torch."""
    gm._tracer_cls = None
    gm._tracer_extras = {}
    static = gm.meta.get("static_batch")
    gm.meta.clear()
    if static:  # export_onnx reads it: the graph holds one batch size's branch
        gm.meta["static_batch"] = True
    typed = False
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        typed |= node.type is not None
        node.type = None  # string annotations (``from __future__ import annotations``) do not pickle
    if typed:  # the annotations are in the generated code; nothing else here is
        gm.recompile()
    return gm


def masked(model: nn.Module, example_inputs: Any, drop: dict | None, **options) -> fx.GraphModule:
    """A copy of ``model`` with the dropped channels zeroed by hard masks at every mask site.

    ``ChannelGraph.masked`` does the same from an analysis made before (no new trace)."""
    return analyze(model, example_inputs, **options).masked(drop)


def prune_channels(model: nn.Module, example_inputs: Any, drop: dict | None, *, inplace: bool = False,
                   **options) -> fx.GraphModule:
    """The physically pruned model: equal to ``masked(model, example_inputs, drop)`` in eval mode.

    ``ChannelGraph.prune`` does the same from an analysis made before (no new trace)."""
    return analyze(model, example_inputs, **options).prune(drop, inplace=inplace)
