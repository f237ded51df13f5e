"""``ChannelGraph``: what ``analyze`` returns, the channel dependency report of a model.

Example::

    cg = softprune_fx.analyze(model, (torch.randn(1, 3, 32, 32),))
    [g.id for g in cg.groups if g.prunable]
    drop = cg.legalize({"layer1.0.conv1": [0, 1]})
    rich.print(cg.summary())
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import torch.fx as fx
from rich.table import Table

from softprune_fx.passes.analysis import fork
from softprune_fx.passes.flops import count_graph_flops
from softprune_fx.passes.flow import ChannelFlow
from softprune_fx.passes.groups import Group
from softprune_fx.passes.legalize import check_plan, legalize_plan
from softprune_fx.passes.plan import Plan


@dataclass(eq=False)
class ChannelGraph:
    """One analysis of a model: its captured graph (sharing the model's modules, never
    edited), the channel flow and the groups. Every later pass of a pipeline run reads
    it: ``masked`` and ``prune`` work on forks of it, ``flops`` counts on its graph, so a
    run traces the user's model once."""

    gm: fx.GraphModule
    flow: ChannelFlow
    groups: list[Group]
    inputs: tuple = ()                      # the example inputs the graph was captured with
    options: dict = field(default_factory=dict)  # analyze's options, for plans and reports

    def __post_init__(self):
        self.by_id = {g.id: g for g in self.groups}
        self._last_plan = None  # (drop key, checked plan): ``plan`` of the drop asked for last

    @cached_property
    def index(self):
        """The flat channel index of this analysis (built once)."""
        from .index import ChannelIndex
        return ChannelIndex(self)

    @cached_property
    def flops(self) -> int:
        """FlopCounterMode's count of the analysed model on the example inputs (meta tensors)."""
        return count_graph_flops(self.gm, self.inputs)

    # ------------------------------------------------------------------ passes on forks
    def fork(self, *, copy_modules: bool = True, share_tensors: bool = False, compile: bool = True) -> "ChannelGraph":
        """A private copy (graph, flow, groups; modules too unless ``copy_modules=False``;
        ``share_tensors``, ``compile``: see ``softprune_fx.passes.analysis.fork``)."""
        gm, flow, groups = fork(self.gm, self.flow, self.groups, copy_modules=copy_modules,
                                share_tensors=share_tensors, compile=compile)
        return ChannelGraph(gm, flow, groups, self.inputs, self.options)

    def masked(self, drop: dict | None, *, share_weights: bool = False) -> fx.GraphModule:
        """The model with the dropped channels zeroed by hard masks at every mask site
        (a copy; with ``share_weights`` it calls this analysis's modules)."""
        from softprune_fx.passes.masks import insert_hard_masks

        from .api import plain
        self.plan(drop)  # checked here: the engine of this analysis is built once
        f = self.fork(copy_modules=not share_weights)
        return plain(insert_hard_masks(f.gm, f.flow, Plan.from_drop(f.flow, f.groups, drop)))

    def run_masked(self, drop: dict | None, *inputs):
        """Outputs of ``masked(drop)`` on ``inputs`` (default: the example inputs), computed
        on this analysis's graph without building the masked model (eval mode)."""
        from softprune_fx.passes.flops import eval_mode
        from softprune_fx.passes.masks import HardMaskedRun
        with eval_mode(self.gm):
            return HardMaskedRun(self.gm, self.flow, self.plan(drop)).run(*(inputs or self.inputs))

    def prune(self, drop: dict | None, *, inplace: bool = False) -> fx.GraphModule:
        """The physically pruned model; equal to ``masked(drop)`` in eval mode. With
        ``inplace`` the analysed model's own modules are sliced."""
        from softprune_fx.passes.surgery import apply_surgery

        from .api import plain
        from softprune_fx.passes.analysis import own_tensors
        self.plan(drop)  # checked here: the engine of this analysis is built once
        # without inplace: modules copied, tensors shared until surgery has replaced the ones
        # it slices; the rest are copied afterwards (each weight is copied once, not twice)
        f = self.fork(copy_modules=not inplace, share_tensors=not inplace, compile=False)  # surgery compiles
        pruned = apply_surgery(f.gm, f.flow, Plan.from_drop(f.flow, f.groups, drop), self.inputs)
        if not inplace:
            own_tensors(pruned, self.gm)
        return plain(pruned)

    def check_capture(self, model) -> float:
        """Run ``model`` and its captured graph on the example inputs (eval mode, the same
        random numbers) and raise CaptureError when they differ: Python in the forward took
        another path while tracing than when the model runs (a test on a global flag, on an
        object's identity, ``type(x) is torch.Tensor``). Every pass reads the captured graph,
        so a pruned model is only as right as its capture. Returns max|diff|; a capture made
        in training mode is not compared (its branches are the training ones)."""
        from softprune_fx.onnx_check import compare
        from softprune_fx.passes.capture import python_state_kept
        from softprune_fx.passes.errors import CaptureError
        from softprune_fx.passes.flops import eval_mode

        from .finish import MASKED_REL, same_randomness
        if self.gm.training:
            return 0.0
        with eval_mode(model):
            with same_randomness(self.inputs), python_state_kept(model):  # what a forward caches is undone
                want = model(*self.inputs)
            with same_randomness(self.inputs):
                got = self.gm(*self.inputs)
        diff, ok = compare(want, got, MASKED_REL)
        if not ok:
            raise CaptureError(f"the traced graph does not compute what {type(model).__name__} computes (max|diff| "
                               f"{diff:.3g}): Python in its forward took another path while tracing; mark the part "
                               "that differs as a leaf (leaf_modules=...) and report it")
        return diff

    @property
    def constraints(self) -> list:
        return self.flow.constraints

    @property
    def untraced(self) -> list[str]:
        return list(self.gm.meta.get("untraced", ()))

    @property
    def specialisations(self) -> list[dict]:
        """What capture specialised on: ``{kind, expr, value, where (file:line), code, reads, batch}``."""
        return list(self.gm.meta.get("specialisations", ()))

    def group(self, gid: str) -> Group:
        return self.by_id[gid]

    def plan(self, drop: dict | None) -> Plan:
        """A checked plan for a legal ``drop`` (raises IllegalDropError otherwise)."""
        key = tuple(sorted((k, tuple(int(i) for i in v)) for k, v in (drop or {}).items()))
        if self._last_plan is not None and self._last_plan[0] == key:  # prune and the check ask for the same drop
            return self._last_plan[1]
        plan = Plan.from_drop(self.flow, self.groups, drop)
        check_plan(plan, self.constraints)
        self._last_plan = (key, plan)
        return plan

    def legalize(self, drop: dict | None, scores: dict | None = None) -> dict[str, list[int]]:
        """The nearest legal drop to ``drop`` (``drop`` itself when it is legal).

        Among the drops that satisfy every constraint and keep every group, split piece
        and conv group non-empty: the fewest channels changed from ``drop`` (added or
        taken back), then the most dropped, then the lowest score, then the highest
        index; non-empty whenever ``drop`` is and a non-empty legal drop exists. Raises
        IllegalDropError only for unknown groups, out-of-range indices and frozen
        channels named in ``drop``. ``scores`` maps a group id to per-channel scores
        (higher = keep). ``masked``/``prune`` never repair: they refuse an illegal drop.
        """
        plan = Plan.from_drop(self.flow, self.groups, drop)
        return legalize_plan(plan, self.constraints, scores).to_drop()

    # ------------------------------------------------------------------ reports
    def status(self, g: Group) -> str:
        if not g.frozen_channels:
            return "prunable"
        if g.prunable:
            return f"prunable ({len(g.frozen_channels)} frozen: {g.frozen_reason})"
        return f"frozen: {g.frozen_reason}"

    def to_dict(self) -> dict:
        return {
            "groups": [{
                "id": g.id, "width": g.width, "prunable": g.prunable, "kinds": sorted(g.kinds),
                "frozen_channels": g.frozen_channels, "frozen_reason": g.frozen_reason,
                "producers": g.producers, "sites": g.sites,
            } for g in self.groups],
            "untraced": self.untraced,
            "untraced_why": dict(self.gm.meta.get("untraced_why", {})),
            "specialisations": self.specialisations,
            "static_batch": bool(self.gm.meta.get("static_batch", False)),
            "inexact": list(self.flow.inexact),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    def to_networkx(self) -> nx.DiGraph:
        """Bipartite coupling graph: producer -> group -> consumer (mask site)."""
        g = nx.DiGraph()
        for grp in self.groups:
            key = f"group:{grp.id}"
            g.add_node(key, kind="group", width=grp.width, prunable=grp.prunable, kinds=",".join(sorted(grp.kinds)))
            for p in grp.producers:
                g.add_node(f"layer:{p}", kind="layer")
                g.add_edge(f"layer:{p}", key)
            for s in grp.sites:
                g.add_node(f"layer:{s}", kind="layer")
                g.add_edge(key, f"layer:{s}")
        return g

    def summary(self, short: bool = False) -> Table:
        """A rich table: group, kinds, width, status, producers, sites."""
        table = Table(title="channel groups", show_lines=False)
        for col in ("group", "kinds", "width", "status", "producers", "sites"):
            table.add_column(col, overflow="fold")
        rows = [g for g in self.groups if g.prunable] if short else self.groups
        for g in rows:
            table.add_row(g.id, ",".join(sorted(g.kinds)) or "-", str(g.width), self.status(g),
                          _short(g.producers), _short(g.sites))
        prunable = sum(g.width - len(g.frozen_channels) for g in self.groups if not g.is_site_group)
        table.caption = (f"{len(self.groups)} groups, {sum(g.prunable for g in self.groups)} prunable, "
                         f"{prunable} prunable channels")
        return table


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n})" if len(names) > n else "")
