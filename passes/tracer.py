"""The specialising tracer: torch.fx tracing where every Proxy carries its meta value.

Each node gets ``node.meta["val"]`` as it is recorded (meta tensors: no arithmetic, so the
cost does not grow with resolution or batch). Python that consumes a traced value
(``bool``/``if``/``assert``, ``int``, ``len``, iteration, ``math.ceil``, ...) is answered from
it, as torch.export specialises static shapes, and recorded with its source line. Sizes
that flow into torch ops stay graph nodes. A value that depends on tensor contents is
never specialised: it raises :class:`DataDependentError`, and capture makes the submodule
a frozen leaf.

Example::

    tracer = SpecialisingTracer((torch.randn(1, 3, 64, 64),))
    graph = tracer.trace(model)
    tracer.specs  # [Specialisation(kind="bool", where="model.py:12", ...), ...]
"""
from __future__ import annotations

import copy
import inspect
import math
import operator
import types
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map_only

from .specialise import (META, DataDependentError, Specialisation, batch_bound, flat_reads, meta_call,
                         meta_like, node_reads, render, traceback_line, user_frame)
from .trace_patches import FACTORIES, TensorChecks, factories_patched, library_wraps_traced, proxy_buffer_writes



def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class ChannelTracer(fx.Tracer):
    """A Tracer whose leaves are torch.nn's layers, the user's leaves (classes, class names
    or module names) and the modules that failed to trace; it records which non-leaf
    module an exception came from, and why."""

    def __init__(self, leaf_modules: Iterable = (), fallback_leaves: Iterable[str] = ()):
        super().__init__()
        names, types_ = set(), []
        for item in leaf_modules:
            (types_.append(item) if isinstance(item, type) else names.add(str(item)))
        self.leaf_names = names | set(fallback_leaves)
        self.leaf_types = tuple(types_)
        self.failing: str | None = None
        self.failing_why: str = ""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        cls = type(m)
        if self.leaf_names and (cls.__name__ in self.leaf_names
                                or f"{cls.__module__}.{cls.__qualname__}" in self.leaf_names):
            return True
        if parametrize.is_parametrized(m):  # weight_norm & co: the computed weight is followed
            return False
        return super().is_leaf_module(m, qualname) or _inherits_torch_layer(cls)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            name = self.path_of_module(m)
            if self.failing is None and not self.is_leaf_module(m, name):
                self.failing = name
                line = traceback_line(exc)
                msg = f"{type(exc).__name__}: {one_line(exc)}"
                self.failing_why = msg + (f" at {line}" if line and line not in msg else "")
            raise


_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
_HARMLESS = frozenset({"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__"})


def _inherits_torch_layer(cls: type) -> bool:
    """A subclass of a torch.nn layer that overrides none of its methods (HF EfficientNet's
    depthwise ``nn.Conv2d`` subclass) is that layer: a leaf, with the layer's rule."""
    if cls.__module__.startswith("torch."):
        return False
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("torch.nn") and base not in _CONTAINERS:
            mine = set()
            for klass in cls.__mro__[:cls.__mro__.index(base)]:
                mine |= {k for k, v in vars(klass).items() if callable(v) and hasattr(base, k)}
            return not (mine - _HARMLESS)
    return False


class SpecProxy(fx.Proxy):
    """A Proxy whose Python conversions are answered from its node's meta value."""

    def __getattr__(self, k: str):
        return SpecAttribute(self, k)

    def __bool__(self):
        return self.tracer.specialise(self, "bool", bool)

    def __int__(self):
        return self.tracer.specialise(self, "int", int)

    def __index__(self):
        return self.tracer.specialise(self, "index", operator.index)

    def __float__(self):
        return self.tracer.specialise(self, "float", float)

    def __ceil__(self):
        return self.tracer.specialise(self, "math", math.ceil)

    def __floor__(self):
        return self.tracer.specialise(self, "math", math.floor)

    def __trunc__(self):
        return self.tracer.specialise(self, "math", math.trunc)

    def __round__(self, ndigits=None):
        return self.tracer.specialise(self, "math", lambda v: round(v, ndigits))

    def __len__(self):
        return self.tracer.spec_len(self)

    def __iter__(self):
        return self.tracer.spec_iter(self)

    def keys(self):
        return self.tracer.spec_keys(self)

    def __setitem__(self, index, value):
        """``t[index] = v``: recorded as ``operator.setitem`` (side-effectful, kept in order),
        which the channel analysis freezes; fx's own Proxy cannot be written to."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class SpecAttribute(SpecProxy, fx.proxy.Attribute):
    """``x.shape``, ``x.size``...: a lazy attribute node, with SpecProxy's conversions."""


class SpecialisingTracer(ChannelTracer):
    """ChannelTracer over the example inputs: meta values on every node, Python answered
    from them, specialisations recorded (``specs``, ``frozen_extents``)."""

    proxy_buffer_attributes = True

    def __init__(self, inputs: tuple, leaf_modules: Iterable = (), fallback_leaves: Iterable[str] = (),
                 trace_library_wraps: bool = True):
        super().__init__(leaf_modules, fallback_leaves)
        self.inputs = inputs
        self.trace_library_wraps = trace_library_wraps  # trace_patches.library_wraps_traced
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.batch = first.shape[0] if first is not None and first.dim() >= 1 else None
        self.specs: list[Specialisation] = []
        self.frozen_extents: list[dict] = []
        self._reads: dict[fx.Node, Any] = {}
        self._from_input: set[fx.Node] = set()
        self._twins: dict[int, nn.Module] = {}
        self._modules: dict[str, nn.Module] | None = None
        self._in_meta = False  # computing a meta value: module calls and attributes run as is
        self.output_type: type | None = None  # what the traced forward returned (passes/outputs.py)

    # ------------------------------------------------------------------ recording
    def proxy(self, node: fx.Node) -> SpecProxy:
        return SpecProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders for exactly the inputs given (``forward(x, *args, **kwargs)``,
        defaults and keyword-only parameters left to Python)."""
        names = _input_names(root_fn, len(self.inputs), is_module)
        proxies = []
        for name, value in zip(names, self.inputs):
            p = self.create_proxy("placeholder", name, (), {})
            p.node.meta["val"] = tree_map_only(torch.Tensor, meta_like, value)
            self._from_input.add(p.node)
            proxies.append(p)

        self._checks.answer_in(_code_globals(root_fn))

        tracer = self

        def exact(*args):
            out = root_fn(*args)
            tracer.output_type = type(out)  # fx records a returned mapping as a plain dict
            return out
        # the user's globals, so fx still autowraps what their module imported
        fn = types.FunctionType(exact.__code__, root_fn.__globals__, "forward", None, exact.__closure__)
        return fn, ([self.root] if is_module else []) + proxies

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind in ("placeholder", "output") or not isinstance(rv, fx.Proxy):
            return rv
        node = rv.node
        if kind == "get_attr":
            value = self._attr(target)
            node.meta["val"] = meta_like(value) if isinstance(value, torch.Tensor) else value
            return rv
        self._found_input = False
        margs, mkwargs = self._meta_arg(args), self._meta_arg(kwargs)
        if self._found_input:
            self._from_input.add(node)
        node.meta["val"] = value = self._meta_value(kind, target, margs, mkwargs, node, (args, kwargs))
        if not isinstance(value, torch.Tensor) and not _has_tensor(value):
            reads = node_reads(kind, target, args, value, self._reads)
            if reads:
                self._reads[node] = reads
        return rv

    def _meta_arg(self, a: Any) -> Any:
        if type(a) in _PLAIN:
            return a
        if isinstance(a, fx.Proxy):
            node = a.node
            if node in self._from_input:
                self._found_input = True
            v = node.meta.get("val", _MISSING)
            if v is _MISSING:
                raise DataDependentError(f"no meta value for {node.name}")
            return META if isinstance(v, torch.device) else v
        if isinstance(a, torch.Tensor):
            return meta_like(a)  # a real constant: its shape, never its data
        if isinstance(a, (tuple, list)):
            if type(a) is torch.Size:
                return a
            items = [self._meta_arg(x) for x in a]
            return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
        if isinstance(a, dict):
            return {k: self._meta_arg(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self._meta_arg(a.start), self._meta_arg(a.stop), self._meta_arg(a.step))
        if isinstance(a, torch.device):
            return META
        return a

    def _meta_value(self, kind, target, args, kwargs, node, raw) -> Any:
        if kind == "call_function" and target in FACTORIES:
            kwargs = {**kwargs, "device": META}
        if kind == "call_function" and target is getattr and args[1] in ("device", "is_cuda", "is_cpu", "is_meta"):
            return getattr(self.device, "type") == args[1][3:] if args[1] != "device" else self.device
        module = self._module(target) if kind == "call_module" else None
        self._in_meta, grad = True, torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # per call, not around the trace: the user's code may ask
        try:
            return meta_call(kind, target, args, kwargs, module, self._twins)
        except Exception as exc:  # noqa: BLE001 - no meta value: a leaf runs on zeros, else it is data-dependent
            if kind == "call_module":  # fresh arguments: the failed forward may have changed them
                return _run_on_zeros(module, self._meta_arg(raw[0]), self._meta_arg(raw[1]), node)
            where, _ = user_frame()
            raise DataDependentError(
                f"no meta value for {render(node)} at {where} ({type(exc).__name__}: {one_line(exc)[:120]})"
            ) from exc
        finally:
            self._in_meta = False
            torch._C._set_grad_enabled(grad)

    def _module(self, target: str) -> nn.Module:
        if self._modules is None:
            self._modules = dict(self.root.named_modules())
        return self._modules.get(target) or self.root.get_submodule(target)

    def call_module(self, m, forward, args, kwargs):
        if self._in_meta:
            return forward(*args, **kwargs)
        self._checks.answer_in(_code_globals(type(m).forward))
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._in_meta or not isinstance(attr_val, torch.Tensor):  # only tensors become get_attr nodes
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _attr(self, target: str) -> Any:
        obj, self._in_meta = self.root, True  # plain attribute reads, no proxies
        try:
            for atom in target.split("."):
                obj = getattr(obj, atom)
        finally:
            self._in_meta = False
        return obj

    # ------------------------------------------------------------------ specialising
    def specialise(self, proxy: fx.Proxy, kind: str, convert) -> Any:
        """Answer a Python conversion of ``proxy`` from its meta value, and record it."""
        node = proxy.node
        value = node.meta.get("val", _MISSING)
        if value is _MISSING or isinstance(value, torch.Tensor) or _has_tensor(value):
            where, code = user_frame()
            raise DataDependentError(
                f"{kind}() of a value that depends on tensor contents ({render(node)}) at {where}: `{code}`")
        result = convert(value)
        self._record(kind, node, result, freeze=kind != "bool", convert=convert)
        return result

    def spec_len(self, proxy: fx.Proxy) -> int:
        value = proxy.node.meta.get("val", _MISSING)
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise TypeError("len() of a 0-d tensor")
            self._record("len", proxy.node, value.shape[0], freeze=True, reads={(proxy.node, 0)})
            return value.shape[0]
        if value is _MISSING:
            raise DataDependentError(f"len() of {proxy.node.name}, which has no meta value")
        if not isinstance(value, torch.Size):  # a rank is static in any graph
            self._record("len", proxy.node, len(value), freeze=True)
        return len(value)

    def spec_iter(self, proxy: fx.Proxy):
        value = proxy.node.meta.get("val", _MISSING)
        if isinstance(value, dict):
            return iter(list(value))
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise TypeError("iteration over a 0-d tensor")
            n = value.shape[0]
            self._record("iter", proxy.node, n, freeze=True, reads={(proxy.node, 0)})
        elif isinstance(value, (tuple, list)):
            n = len(value)
            if not isinstance(value, torch.Size):
                last = self.specs[-1] if self.specs else None
                if last is not None and last.kind == "len" and last.expr == render(proxy.node):
                    self.specs.pop()  # list(x) asks len() first
                self._record("iter", proxy.node, n, freeze=False)  # pieces of an op: surgery keeps their count
        else:
            raise DataDependentError(f"iteration over {proxy.node.name}, which has no sequence meta value")
        return (proxy[i] for i in range(n))

    def spec_keys(self, proxy: fx.Proxy):
        value = proxy.node.meta.get("val")
        if not isinstance(value, dict):
            raise DataDependentError(f"keys() of {proxy.node.name}, which is not a dict")
        return list(value)

    def _record(self, kind: str, node: fx.Node, value: Any, freeze: bool, reads=None, convert=None) -> None:
        where, code = user_frame()
        reads = reads if reads is not None else flat_reads(self._reads.get(node))
        batch = any(self._is_batch(n, d) for n, d in reads)
        if batch and convert is not None:  # checked at a second batch size: `None != x.shape` is not batch-bound
            batch = batch_bound(node, value, convert, self._is_batch)
        spec = Specialisation(kind, render(node), value, where, code,
                              sorted((n.name, d) for n, d in reads), batch)
        self.specs.append(spec)
        if freeze:
            for n, d in reads:
                self.frozen_extents.append({"node": n.name, "dim": d,
                                            "reason": f"extent consumed by Python at {where}: `{code}`"})

    def _is_batch(self, node: fx.Node, dim: int) -> bool:
        v = node.meta.get("val")
        return (dim == 0 and self.batch is not None and node in self._from_input
                and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch)

    # ------------------------------------------------------------------ tracing
    def trace(self, root, concrete_args=None):
        with factories_patched(self), proxy_buffer_writes(), library_wraps_traced(self.trace_library_wraps), \
                TensorChecks((SpecProxy, SpecAttribute)) as checks:
            self._checks = checks
            return super().trace(root, concrete_args)


_MISSING = object()
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.Size})


def _has_tensor(value: Any) -> bool:
    if isinstance(value, (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)):
        return False
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(value))


def _code_globals(fn) -> dict:
    """The globals of the module that defines ``fn`` (through decorators such as HF's
    ``can_return_tuple``, which keep ``__wrapped__``)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    return getattr(fn, "__globals__", None) or {}


def _input_names(root_fn, n: int, is_module: bool) -> list[str]:
    """The forward's positional parameter names for ``n`` inputs (``args_i`` past them)."""
    co = getattr(root_fn, "__code__", None)
    names = list(co.co_varnames[:co.co_argcount]) if co is not None else []
    names = names[1:] if is_module else names
    if n > len(names) and not (co is not None and co.co_flags & 0x04):  # no *args
        raise TypeError(f"forward takes {len(names)} inputs but {n} example inputs were given")
    return names[:n] + [f"args_{i}" for i in range(max(0, n - len(names)))]


def _run_on_zeros(module: nn.Module, args, kwargs, node: fx.Node) -> Any:
    """A leaf without a meta kernel (data-dependent Python) runs on zeros of its input
    shapes, on a private copy of its module."""
    zeros = lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t  # noqa: E731
    from .errors import CaptureError
    try:
        out = copy.deepcopy(module)(*tree_map_only(torch.Tensor, zeros, args),
                                    **tree_map_only(torch.Tensor, zeros, kwargs))
    except Exception as exc:  # noqa: BLE001 - the model itself does not run
        raise CaptureError(f"the model does not run on the example inputs (node {node.name}): "
                           f"{one_line(exc)}") from exc
    return tree_map_only(torch.Tensor, meta_like, out)
