"""What the specialising tracer patches while it runs: torch's factories (sizes given as
proxies record a node) and ``nn.Module.__setattr__`` (a traced value assigned to a buffer).

Example::

    with factories_patched(tracer), proxy_buffer_writes():
        graph = fx.Tracer.trace(tracer, model)
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch import nn

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
