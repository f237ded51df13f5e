"""The model's output type on its captured graph, and on every graph made from it.

torch.fx records a returned mapping as a plain ``dict`` (namedtuples keep their type), so
a Hugging Face model, whose forward returns a ``ModelOutput``, would come back from capture,
``masked`` and ``prune`` as a dict: ``pruned(x).logits`` and ``pruned(x)[0]`` fail where
``model(x).logits`` works. ``TypedOutput`` is the graph's code generator instead: the
generated forward returns ``cls(**items)``, and so does an ``fx.Interpreter`` run (through
``process_outputs``). The graph itself is unchanged (its output node still holds the dict
every pass reads), and ``copy_output_type`` carries the generator to the graphs that the
passes copy from it.

A type is kept only when rebuilding it from the traced values round-trips (same type, same
keys in the same order, the same objects); otherwise the graph returns the dict, as before.
A pickled GraphModule is re-traced from its code when it is loaded, which records the
dict again: ``torch.load`` of a pruned model returns a dict (the type is kept in memory).

Example::

    keep_output_type(gm, ModelOutputClass)  # after tracing; False when it does not round-trip
    type(gm(x))                             # ModelOutputClass
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch.fx.graph import CodeGen


class TypedOutput(CodeGen):
    """Generates ``return <cls>(**{...})`` for a graph whose output node holds a dict."""

    def __init__(self, cls: type):
        super().__init__()
        self.cls = cls
        # a global of the generated code; node names never start with this prefix
        self.name = f"_output_type_{cls.__name__}"

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [(self.name, self.cls)]

    def generate_output(self, output_args, *, descs=None, repr_fn=None) -> str:
        return f"return {self.name}(**{(repr_fn or repr)(output_args)})"

    def process_outputs(self, outputs: Any) -> Any:
        return self.cls(**outputs) if isinstance(outputs, dict) else outputs


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def keep_output_type(gm: fx.GraphModule, cls: type | None) -> bool:
    """Give ``gm`` a forward that returns ``cls`` (a dict subclass the traced forward
    returned) when ``cls(**dict)`` rebuilds it from the traced values exactly."""
    out = output_node(gm.graph).args[0]
    if cls is None or cls is dict or not isinstance(out, dict) or not issubclass(cls, dict):
        return False
    values = fx.node.map_arg(out, lambda n: n.meta.get("val", n))
    try:
        rebuilt = cls(**values)
    except Exception:  # noqa: BLE001 - a constructor that does not take its items: keep the dict
        return False
    if type(rebuilt) is not cls or list(rebuilt.keys()) != list(values.keys()) or \
            any(rebuilt[k] is not v for k, v in values.items()):
        return False
    gm.graph.set_codegen(TypedOutput(cls))
    gm.recompile()
    return True


def copy_output_type(graph: fx.Graph, source: fx.Graph) -> None:
    """``graph`` (a copy of ``source``) returns what ``source`` returns."""
    if isinstance(source._codegen, TypedOutput):
        graph.set_codegen(source._codegen)
