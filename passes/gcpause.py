"""``gc_paused``: Python's cyclic garbage collector off for the length of one pass.

Tracing, the channel flow and surgery allocate tens of thousands of small objects (fx
nodes, proxies, layouts), and each allocation burst triggers collections that re-scan
every live object of the process, torch's own included: 5-12% of a one-shot prune of
torchvision's MobileNetV2 (BENCHMARKS.md section 9). Nothing is leaked: the cycles the
pass leaves behind are collected as usual once it returns, and a collector the caller
had switched off stays off.

Example::

    with gc_paused():
        gm = capture(model, inputs)
"""
from __future__ import annotations

import contextlib
import functools
import gc


@contextlib.contextmanager
def gc_paused():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def without_gc(fn):
    """``fn`` run inside ``gc_paused()``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gc_paused():
            return fn(*args, **kwargs)
    return wrapper
