"""Weights computed from parameters only: timm's ``StdConv2d``/``ScaledStdConv2d`` weight
standardisation (``F.batch_norm`` over the weight), ``weight_norm`` parametrizations, a
reshaped or scaled parameter.

The functional conv/linear that reads such a weight owns its output channels as if the
weight were the parameter itself (the key is the parameter the weight is computed from).
The computation may mix over the input-channel axis (standardisation over the fan-in), so
surgery folds it: the weight is evaluated once on the real parameters (a constant in
eval mode), sliced, and stored in place of the raw parameter; the subgraph that computed
it is erased. The pruned model is exact in eval mode; fine-tuning it trains a plain conv.

Example::

    src = param_source(weight_node)   # the get_attr node it is computed from, or None
    value = evaluate(gm, weight_node)  # the real computed weight
"""
from __future__ import annotations

import torch
import torch.fx as fx


def param_source(w) -> fx.Node | None:
    """The parameter a weight node is computed from, when every ancestor is a parameter
    (``get_attr``) or a constant: the one of the weight's shape, else the first."""
    if not isinstance(w, fx.Node):
        return None
    if w.op == "get_attr":
        return w
    seen, stack, attrs = set(), [w], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            attrs.append(n)
        elif n.op in ("call_function", "call_method") or (n.op == "call_module" and _stateless(n)):
            stack.extend(n.all_input_nodes)
        else:
            return None  # an activation, an input or a module with state: not a parameter computation
    shape = getattr(w.meta.get("val"), "shape", None)
    same = [a for a in attrs if getattr(a.meta.get("val"), "shape", None) == shape]
    return (same or attrs or [None])[0]


def subgraph(w: fx.Node) -> set[fx.Node]:
    """The nodes of a parameter-only computation, ``w`` included."""
    seen, stack = set(), [w]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def adopt_params(ctx, w: fx.Node, src: fx.Node, out_atoms) -> None:
    """Parameters read only inside the computation of ``w`` (ScaledStdConv2d's ``gain``),
    one entry per output channel: their atoms are the conv's output atoms. The folding makes
    them exact, so the freeze an op of the computation put on them (``F.batch_norm`` with no
    running statistics) is lifted."""
    nodes = subgraph(w)
    for a in nodes:
        if a.op != "get_attr" or a is src or not all(u in nodes for u in a.users):
            continue
        lay = ctx.layout(a)
        atoms = lay[lay >= 0] if lay is not None else ()
        if len(atoms) == len(out_atoms) and len(set(atoms.tolist())) == len(atoms):
            for atom in atoms.tolist():
                ctx.table.frozen.pop(atom, None)
            ctx.unify(atoms, out_atoms)


def _stateless(n: fx.Node) -> bool:
    """A parametrization module (``weight_norm``'s ``_WeightNorm``): no parameters or buffers."""
    root = n.graph.owning_module
    if root is None:
        return False
    m = root.get_submodule(n.target)
    return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())


def evaluate(gm: fx.GraphModule, w: fx.Node) -> torch.Tensor:
    """The real value of a parameter-only node (run once, without autograd)."""
    env: dict[fx.Node, object] = {}

    def run(n: fx.Node):
        if n not in env:
            if n.op == "get_attr":
                obj = gm
                for atom in n.target.split("."):
                    obj = getattr(obj, atom)
                env[n] = obj
            else:
                args, kwargs = fx.node.map_arg(n.args, run), fx.node.map_arg(n.kwargs, run)
                if n.op == "call_module":
                    env[n] = gm.get_submodule(n.target)(*args, **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                        getattr(args[0], n.target)(*args[1:], **kwargs)
        return env[n]
    with torch.no_grad():
        return run(w).detach().clone()


def erase_unused(graph: fx.Graph, start: fx.Node) -> list[str]:
    """Erase ``start`` and the ancestors nothing else reads; the targets of the erased
    ``get_attr`` nodes are returned."""
    gone, stack = [], [start]
    while stack:
        n = stack.pop()
        if n.users or n.op not in ("get_attr", "call_function", "call_method", "call_module"):
            continue
        inputs = list(n.all_input_nodes)
        if n.op == "get_attr":
            gone.append(n.target)
        graph.erase_node(n)
        stack.extend(inputs)
    return gone


def still_read(gm: fx.GraphModule, target: str) -> bool:
    """Whether any node still reads the parameter ``target`` (or calls its module)."""
    owner = target.rpartition(".")[0]
    return any((n.op == "get_attr" and n.target == target) or (n.op == "call_module" and n.target == owner)
               for n in gm.graph.nodes)
