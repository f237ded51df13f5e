"""What the specialising tracer patches while it runs: torch's factories (sizes given as
proxies record a node), ``nn.Module.__setattr__`` (a traced value assigned to a buffer) and
``torch.is_tensor``/``isinstance``/``torch.finfo`` (answered for the traced value, as in the
real run).

Example::

    with factories_patched(tracer), proxy_buffer_writes(), TensorChecks(proxy_types):
        graph = fx.Tracer.trace(tracer, model)
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.fx as fx
from torch import nn

from .specialise import TORCH_DIR, is_internal, traced_tensor, traced_value, user_code

#: torch factories patched while tracing so that sizes given as proxies record a node
#: (``torch.zeros(h, w)`` takes sizes as varargs, which plain fx cannot see)
PATCHED_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "eye", "tensor",
                     "as_tensor", "linspace")
FACTORIES = frozenset(getattr(torch, n) for n in (*PATCHED_FACTORIES, "arange"))


def _has_proxy(values) -> bool:
    """A Proxy anywhere in (nested) tuples, lists and dicts."""
    if isinstance(values, fx.Proxy):
        return True
    if isinstance(values, (tuple, list)):
        return any(_has_proxy(v) for v in values)
    if isinstance(values, dict):
        return any(_has_proxy(v) for v in values.values())
    return False


@contextlib.contextmanager
def factories_patched(tracer: fx.Tracer):
    """``torch.zeros(h, w)`` with traced sizes records a node instead of failing."""
    saved = {name: getattr(torch, name) for name in PATCHED_FACTORIES}

    def wrap(orig):
        def factory(*args, **kwargs):
            if not tracer._in_meta and _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", orig, args, kwargs)
            return orig(*args, **kwargs)
        return factory
    try:
        for name, orig in saved.items():
            setattr(torch, name, wrap(orig))
        yield
    finally:
        for name, orig in saved.items():
            setattr(torch, name, orig)


@contextlib.contextmanager
def proxy_buffer_writes():
    """A forward that assigns a traced value to a registered buffer or parameter
    (``self.anchors = ...``) stores it as a plain attribute that shadows it; capture's
    state restore removes it afterwards."""
    orig = nn.Module.__setattr__

    def setattr_(self, name, value):
        if isinstance(value, fx.Proxy) and (name in self._buffers or name in self._parameters):
            object.__setattr__(self, name, value)
        else:
            orig(self, name, value)
    nn.Module.__setattr__ = setattr_
    try:
        yield
    finally:
        nn.Module.__setattr__ = orig


class TensorChecks:
    """``isinstance(x, ...)`` and ``torch.is_tensor(x)`` in the model's own code answer for the
    value a Proxy stands for, as in the real run: a Proxy is no Tensor and no tuple, so the
    trace took the other branch silently (``tuple(v for v in out.values() if isinstance(v,
    torch.Tensor))`` traced to ``()``; ZoeDepth's neck raised on ``isinstance(hidden_states,
    (tuple, list))`` and became a leaf).

    ``isinstance`` is answered in the globals of the user's modules whose code the tracer
    runs (``answer_in``, for the root's forward and each traced submodule's): torch, fx and
    the standard library keep the builtin, so the trace pays nothing for their many calls,
    and no ``__class__`` trick is used (torch's C++ argument parsing honours ``__class__``
    and would read a Proxy as a tensor). Everything is restored on exit.

    Example::

        with TensorChecks((SpecProxy, SpecAttribute)) as checks:
            checks.answer_in(type(model).forward.__globals__)
    """

    def __init__(self, proxy_types: tuple):
        self.proxy_types = proxy_types
        self.touched: list[dict] = []
        self.seen: set[int] = set()

    def isinstance(self, obj, cls) -> bool:
        if type(obj) in self.proxy_types:  # the real run's value: a tensor, a tuple of them, a size
            value = traced_value(obj, _MISSING)
            return _isinstance(obj, cls) or (value is not _MISSING and _isinstance(value, cls))
        return _isinstance(obj, cls)

    def is_tensor(self, obj) -> bool:
        if type(obj) in self.proxy_types and user_code(sys._getframe(1)):
            return traced_tensor(obj)
        return _is_tensor(obj)

    def finfo(self, dtype=None):
        """``torch.finfo(x.dtype)`` (RT-DETR's anchors): the dtype a traced ``.dtype`` stands for."""
        if dtype is None:
            return _finfo()
        return _finfo(traced_value(dtype) if type(dtype) in self.proxy_types else dtype)

    def iinfo(self, dtype):
        return _iinfo(traced_value(dtype) if type(dtype) in self.proxy_types else dtype)

    def answer_in(self, module_globals: dict) -> None:
        """Answer ``isinstance`` for the code of the module owning ``module_globals``."""
        if id(module_globals) in self.seen:
            return
        self.seen.add(id(module_globals))
        if "isinstance" in module_globals or is_internal(module_globals.get("__file__") or ""):
            return  # a module's own ``isinstance`` is left alone; torch and the stdlib keep theirs
        module_globals["isinstance"] = self.isinstance
        self.touched.append(module_globals)

    def __enter__(self):
        torch.is_tensor, torch.finfo, torch.iinfo = self.is_tensor, self.finfo, self.iinfo
        return self

    def __exit__(self, *exc):
        torch.is_tensor, torch.finfo, torch.iinfo = _is_tensor, _finfo, _iinfo
        for g in self.touched:
            if g.get("isinstance") == self.isinstance:
                del g["isinstance"]
        self.touched.clear()


_isinstance, _is_tensor, _finfo, _iinfo = isinstance, torch.is_tensor, torch.finfo, torch.iinfo
_MISSING = object()


@contextlib.contextmanager
def library_wraps_traced(enabled: bool = True):
    """``torch.fx.wrap`` marks functions plain fx cannot trace (Python on shapes:
    torchvision's Swin window attention, timm's position-embedding resampling). The
    specialising tracer can, so an installed library's wrapped function without a channel
    rule is traced through, its ops each followed by their own rule, instead of becoming one
    opaque node that freezes everything it reads. Functions of torch, of the user's own
    code (``register_op`` targets among them) and those with a rule (torchvision's
    ``stochastic_depth``) stay wrapped. Capture retries with every wrap kept when tracing
    through one fails outside any submodule."""
    from torch.fx import _symbolic_trace as st

    from .registry import has_rule
    removed = {}
    table = getattr(st, "_wrapped_fns_to_patch", None)  # torch-private: a torch without it keeps every wrap
    if enabled and isinstance(table, dict):
        for key, frame in list(table.items()):
            path = frame.get("__file__") or ""
            installed = ("site-packages" in path or "dist-packages" in path) and not path.startswith(TORCH_DIR)
            if installed and not has_rule(frame.get(key[1])):
                removed[key] = table.pop(key)
    try:
        yield
    finally:
        if removed:
            table.update(removed)
