"""Capture: trace a model with the specialising tracer; a meta value on every node.

Tracing specialises Python to the example inputs (passes/tracer.py): ``if``, ``len``,
iteration over ``chunk``/``split`` results and shape arithmetic are answered from the meta
values and recorded in ``gm.meta["specialisations"]`` with their source lines; sizes that
feed torch ops stay nodes. ``if self.training:`` follows the mode the model is in. A
submodule that cannot be traced (data-dependent control flow, ``.item()``, unsupported
Python) is retried as a leaf and recorded in ``gm.meta["untraced"]`` (reasons with source
lines in ``gm.meta["untraced_why"]``); the channel analysis treats its channels as unknown.

Shapes come from the tracer itself (meta tensors: no data, no memory traffic), so their
cost does not grow with input resolution or batch. Only a leaf without a meta kernel runs
on zero tensors of its input shapes, on a private copy of its module. The user's model is
never changed, and Python state a forward writes (``self.anchors``, caches) is restored.

Example::

    gm = capture(model, (torch.randn(1, 3, 224, 224),))
    gm.graph.nodes  # each node.meta["val"] holds a meta tensor (or a structure of them)
    gm.meta["specialisations"]  # [{"kind": "bool", "where": "model.py:12", ...}]
"""
from __future__ import annotations

import copy
import inspect
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import tree_leaves, tree_map_only

from .errors import CaptureError
from .inputs import as_inputs as as_input_tuple  # noqa: F401 (one normaliser for both)
from .outputs import keep_output_type
from .shapes import fast_function_shape, fast_module_shape
from .specialise import traceback_line
from .trace_patches import FACTORIES
from .tracer import ChannelTracer, SpecialisingTracer, one_line as _one_line  # noqa: F401 (re-exported)

MAX_LEAF_RETRIES = 64
_IMMUTABLE = (immutable_list, immutable_dict)

try:  # code generated on first use: the analysis interprets its graph and every pass forks it,
    # so an eager compile of the captured graph was a fifth to a third of capture (MobileNetV2:
    # 24 -> 15 ms); calling it, ``.code``, ``print`` and pickling compile it as before
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - torch without it
    _GraphModule = fx.GraphModule


def trace(model: nn.Module, leaf_modules: Iterable = (), n_inputs: int | None = None,
          example_inputs: tuple | None = None) -> fx.GraphModule:
    """Trace ``model`` (not copied: the GraphModule shares its submodules), retrying
    untraceable submodules as leaves (``gm.meta["untraced"]``, reasons in ``untraced_why``).

    With ``example_inputs`` the specialising tracer runs: exactly those inputs, a meta
    value on every node, specialisations in ``gm.meta``. Without, plain torch.fx (no
    shapes); then with ``n_inputs``, forward parameters past the first ``n_inputs`` that
    have defaults are traced at their defaults, as a call with that many inputs runs them."""
    leaf_modules = tuple(leaf_modules)
    concrete = None if example_inputs is not None else _defaults_after(model, n_inputs)
    fallback: list[str] = []
    why: dict[str, str] = {}
    through = True  # library functions marked torch.fx.wrap are traced through (trace_patches)
    for _ in range(MAX_LEAF_RETRIES):
        tracer = (SpecialisingTracer(example_inputs, leaf_modules, fallback, through) if example_inputs is not None
                  else ChannelTracer(leaf_modules, fallback))
        try:
            with python_state_kept(model):  # also drops the tracer's _tensor_constant attributes
                graph = tracer.trace(model, concrete_args=concrete)
                gm = _GraphModule(tracer.root, graph, type(model).__name__)  # copies what it reads
                # unpickling re-traces the generated code with this class, and the specialising
                # tracer needs the example inputs: torch's own tracer (all modules leaves) instead
                gm._tracer_cls = None
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure is retried or reported
            if not tracer.failing and through and example_inputs is not None:
                through = False  # outside any submodule: keep the wraps rather than fail
                continue
            if not tracer.failing or tracer.failing in fallback:
                line = traceback_line(exc)
                raise CaptureError(
                    f"torch.fx cannot trace {type(model).__name__}.forward itself"
                    f"{f' at {line}' if line else ''}: {type(exc).__name__}: {_one_line(exc)}; "
                    "pass leaf_modules= for the part that cannot be traced") from exc
            fallback.append(tracer.failing)
            why[tracer.failing] = tracer.failing_why
            continue
        gm.meta["untraced"] = list(fallback)
        gm.meta["untraced_why"] = why
        if example_inputs is not None:
            _record_specialisations(gm, tracer)
            keep_output_type(gm, tracer.output_type)
        return gm
    raise CaptureError(f"gave up after {MAX_LEAF_RETRIES} untraceable submodules")


def _record_specialisations(gm: fx.GraphModule, tracer: SpecialisingTracer) -> None:
    """Specialisations into ``gm.meta``; Python-valued nodes nothing reads are dropped."""
    gm.meta["specialisations"] = [s.to_dict() for s in tracer.specs]
    gm.meta["static_batch"] = any(s.batch for s in tracer.specs)
    gm.meta["frozen_extents"] = tracer.frozen_extents
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if (node.op in ("call_function", "call_method") and not node.users
                and not isinstance(node.meta.get("val"), torch.Tensor)
                and (node.op == "call_method" or node.target in _PURE) and not _tensor_in(node.meta.get("val"))):
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


_PURE = frozenset({getattr, *(getattr(operator, n) for n in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge",
    "getitem", "and_", "or_", "not_", "abs"))})


def _tensor_in(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(value))


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
_HOOK_DICTS = tuple(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))


class python_state_kept:
    """Restore the plain-Python containers and attributes of every module after tracing.

    A forward may cache into ``self`` (timm's LeViT stores ``attention_biases[:, idxs]`` in
    ``self.attention_bias_cache`` outside tracing-aware branches): traced, that caches a
    Proxy, which a later trace would read from an old graph and which the user's model
    would keep. Dicts, lists and sets are restored in place, attributes the forward
    added are removed, buffers and parameters it reassigned (a recomputed table, YOLO's
    anchors) are put back, and hooks it registered are removed (Hugging Face installs its
    output-recording hooks on the first forward and marks the model: with the mark
    removed but the hooks kept, the next forward installed them twice and recorded every
    hidden state twice); submodules are not touched.

    Example::

        with python_state_kept(model):
            graph = tracer.trace(model)
    """

    def __init__(self, model: nn.Module):
        self.saved = []
        for m in model.modules():
            d = vars(m)
            attrs = {k: v for k, v in d.items() if k not in _MODULE_INTERNALS}
            containers = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
            hooks = tuple(tuple(d[k]) for k in _HOOK_DICTS)  # the handle ids of each hook dict
            self.saved.append((m, attrs, containers, dict(m._buffers), dict(m._parameters), frozenset(d), hooks))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # set and map(is_not) comparisons: this runs over every module of every capture
        # (MobileNetV2: 5 ms of a 37 ms capture as per-key Python loops)
        for m, attrs, containers, buffers, params, keys, hooks in self.saved:
            d = vars(m)
            for k, ids in zip(_HOOK_DICTS, hooks):
                if len(d[k]) != len(ids):
                    for added in d[k].keys() - set(ids):
                        del d[k][added]
            for k in d.keys() - keys - _MODULE_INTERNALS:  # attributes the trace added
                object.__delattr__(m, k)
            for store, saved in ((m._buffers, buffers), (m._parameters, params)):
                if store.keys() != saved.keys() or any(map(operator.is_not, store.values(), saved.values())):
                    store.clear()
                    store.update(saved)
            if any(map(operator.is_not, map(d.get, attrs), attrs.values())):
                for k, v in attrs.items():
                    if d.get(k) is not v:
                        object.__setattr__(m, k, v)
            for k, saved in containers.items():
                v = attrs[k]
                v.clear()
                (v.extend if isinstance(v, list) else v.update)(saved)
        return False


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


def plain_containers(args):
    """fx hands node arguments over as immutable lists and dicts; the generated code passes
    fresh ones, and a function that edits its list argument (torchvision's Swin3D window
    sizes) fails on the immutable copy: interpreters pass plain ones, as the code does."""
    if not any(type(a) in _IMMUTABLE for a in args):
        return args
    return type(args)(list(a) if type(a) is immutable_list else dict(a) if type(a) is immutable_dict else a
                      for a in args)


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
                    value = getattr(self, n.op)(n.target, plain_containers(args), kwargs)
                except Exception:  # noqa: BLE001 - no meta kernel: run on zeros instead
                    value = self._run_on_zeros(n, args, kwargs)
            n.meta["val"] = value
            return value

    def call_function(self, target, args, kwargs):
        if target in FACTORIES:  # torch.rand & co. on the meta device too: no memory, no random numbers drawn
            kwargs = {**kwargs, "device": "meta"}
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
    """Trace ``model`` on ``example_inputs`` and put a meta value on every node
    (``node.meta["val"]``), from the tracer itself: no separate shape pass.

    The model is read, never changed: modes, parameters, buffers and the Python state its
    forward writes stay as they were. ``leaf_modules``: classes, class names or module names.
    """
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, leaf_modules, example_inputs=inputs)
    if any("val" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        MetaShapeProp(gm).propagate(*inputs)  # not reached by the zoo: a safety net
    return gm
