"""Capture: trace a model with torch.fx and put a shape on every node.

Tracing specialises Python control flow, including ``if self.training:`` branches, to
the mode the model is in. A submodule that cannot be traced (data-dependent control
flow, iterating a proxy, unsupported Python) is retried as a leaf, and recorded in
``gm.meta["untraced"]``; the channel analysis then treats its channels as unknown.

Shapes come from running the graph on meta tensors (no data, no memory traffic), so
their cost does not grow with input resolution or batch. Only a node that has no meta
kernel (e.g. data-dependent Python in an untraceable leaf) runs on zero tensors of its
input shapes, on a private copy of its module. The user's model is never changed.

Example::

    gm = capture(model, (torch.randn(1, 3, 224, 224),))
    gm.graph.nodes  # each node.meta["val"] holds a meta tensor (or a structure of them)
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map_only

from .errors import CaptureError
from .inputs import as_inputs as as_input_tuple  # noqa: F401 (one normaliser for both)
from .shapes import fast_function_shape, fast_module_shape

MAX_LEAF_RETRIES = 64


class ChannelTracer(fx.Tracer):
    """A Tracer whose leaves are torch.nn's layers, the user's leaves and the modules
    that failed to trace; it records which non-leaf module an exception came from."""

    def __init__(self, leaf_modules: Iterable = (), fallback_leaves: Iterable[str] = ()):
        super().__init__()
        names, types = set(), []
        for item in leaf_modules:
            (types.append(item) if isinstance(item, type) else names.add(str(item)))
        self.leaf_names = names | set(fallback_leaves)
        self.leaf_types = tuple(types)
        self.failing: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            name = self.path_of_module(m)
            if self.failing is None and not self.is_leaf_module(m, name):
                self.failing = name
            raise


def trace(model: nn.Module, leaf_modules: Iterable = (), n_inputs: int | None = None) -> fx.GraphModule:
    """Trace ``model`` (not copied: the GraphModule shares its submodules), retrying
    untraceable submodules as leaves. ``gm.meta["untraced"]`` lists them. With ``n_inputs``,
    forward parameters past the first ``n_inputs`` that have defaults are traced at their
    defaults, as a call with that many inputs runs them."""
    leaf_modules = tuple(leaf_modules)
    concrete = _defaults_after(model, n_inputs)
    fallback: list[str] = []
    for _ in range(MAX_LEAF_RETRIES):
        tracer = ChannelTracer(leaf_modules, fallback)
        try:
            with python_state_kept(model):  # also drops the tracer's _tensor_constant attributes
                graph = tracer.trace(model, concrete_args=concrete)
                gm = fx.GraphModule(tracer.root, graph, type(model).__name__)  # copies what it reads
        except Exception as exc:  # noqa: BLE001 - any tracing failure is retried or reported
            if not tracer.failing or tracer.failing in fallback:
                raise CaptureError(
                    f"torch.fx cannot trace {type(model).__name__}.forward itself: "
                    f"{type(exc).__name__}: {_one_line(exc)}; pass leaf_modules= for the part "
                    "that cannot be traced") from exc
            fallback.append(tracer.failing)
            continue
        gm.meta["untraced"] = list(fallback)
        return gm
    raise CaptureError(f"gave up after {MAX_LEAF_RETRIES} untraceable submodules")


def _defaults_after(model: nn.Module, n_inputs: int | None) -> dict | None:
    """``{name: default}`` of forward's parameters after the first ``n_inputs`` (hiera's
    ``forward(x, mask=None)``: traced as a Proxy, ``mask is not None`` would take the
    mask branch). None when any of them has no default: tracing keeps them as inputs."""
    if n_inputs is None:
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return None
    extra = params[n_inputs:]
    if not extra or any(p.default is inspect.Parameter.empty for p in extra):
        return None
    return {p.name: p.default for p in extra}


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class python_state_kept:
    """Restore the plain-Python containers and attributes of every module after tracing.

    A forward may cache into ``self`` (timm's LeViT stores ``attention_biases[:, idxs]`` in
    ``self.attention_bias_cache`` outside tracing-aware branches): traced, that caches a
    Proxy, which a later trace would read from an old graph and which the user's model
    would keep. Dicts, lists and sets are restored in place, attributes the forward
    added are removed; parameters, buffers and submodules are not touched.

    Example::

        with python_state_kept(model):
            graph = tracer.trace(model)
    """

    def __init__(self, model: nn.Module):
        self.saved = []
        for m in model.modules():
            attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
            containers = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
            self.saved.append((m, attrs, containers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, attrs, containers in self.saved:
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                if vars(m).get(k) is not v:
                    object.__setattr__(m, k, v)
                if k in containers:
                    v.clear()
                    (v.extend if isinstance(v, list) else v.update)(containers[k])
        return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _to_meta(value: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("meta"), value)


def _to_zeros(value: Any) -> Any:
    """Real zero tensors of the meta shapes: the fallback for ops without a meta kernel."""
    return tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t, value)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (no data copied).

    Whatever its forward writes (a buffer it recomputes, like ConViT's ``rel_indices``, a
    cache) lands in the copy, never in the user's module."""
    memo = {id(t): t.detach().to("meta") for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


class MetaShapeProp(fx.Interpreter):
    """Runs a GraphModule on meta tensors and stores each node's value in ``node.meta["val"]``.

    Example::

        MetaShapeProp(gm).propagate(torch.randn(1, 3, 32, 32))
        gm.graph.output_node().meta["val"].shape
    """

    def __init__(self, gm: fx.GraphModule, fast: bool = True):
        super().__init__(gm, garbage_collect_values=True)
        self._twins: dict[str, nn.Module] = {}
        self.fast = fast  # analytic shapes for hot ops; off when the ops must really run

    def propagate(self, *args):
        with torch.no_grad():
            return self.run(*_to_meta(args))

    def run_node(self, n: fx.Node):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "get_attr":
                value = _to_meta(self.fetch_attr(n.target))
            else:
                try:
                    value = getattr(self, n.op)(n.target, args, kwargs)
                except Exception:  # noqa: BLE001 - no meta kernel: run on zeros instead
                    value = self._run_on_zeros(n, args, kwargs)
            n.meta["val"] = value
            return value

    def call_function(self, target, args, kwargs):
        fast = fast_function_shape(target, args, kwargs) if self.fast else None
        return fast if fast is not None else super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        fast = fast_module_shape(module, args, kwargs) if self.fast else None
        if fast is not None:
            return fast
        twin = self._twins.get(target)
        if twin is None:
            twin = self._twins[target] = _meta_twin(module)
        return twin(*args, **kwargs)

    def _run_on_zeros(self, n: fx.Node, args, kwargs):
        args, kwargs = _to_zeros(args), _to_zeros(kwargs)
        try:
            if n.op == "call_module":
                out = copy.deepcopy(self.fetch_attr(n.target))(*args, **kwargs)
            else:
                out = getattr(super(), n.op)(n.target, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the model itself does not run
            raise CaptureError(
                f"the model does not run on the example inputs (node {n.name}): {_one_line(exc)}") from exc
        return _to_meta(out)


def capture(model: nn.Module, example_inputs: Any, leaf_modules: Iterable = ()) -> fx.GraphModule:
    """Trace ``model`` and put a meta value on every node (``node.meta["val"]``).

    The model is read, never changed: modes, parameters and buffers stay as they were.
    """
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, leaf_modules, n_inputs=len(inputs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise CaptureError(f"{len(inputs)} example inputs given but forward takes {len(placeholders)}")
    MetaShapeProp(gm).propagate(*inputs)
    return gm
