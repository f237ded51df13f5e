"""Latency tables (bilinear, efficient points) and their on-disk cache: one JSON file per key.

The key holds everything a timing depends on: the op's signature and shapes, the grid of
widths, the ONNX Runtime version, the intra-op thread count and the CPU (model name and
the vector extensions the kernels dispatch on). Directory, first match wins: the
``latency_cache=`` argument, ``$SOFTPRUNE_LATENCY_CACHE``, ``$XDG_CACHE_HOME/softprune-fx/latency``,
``~/.cache/softprune-fx/latency``. Only per-op tables are stored: the whole-model
calibration (``LatencyCost._whole``) is measured on every run, since it follows the load.

Example::

    cache = LatencyCache(threads=2)
    cache.get({"op": "conv", ...})          # None until put
    cache.put({"op": "conv", ...}, {"ms": [[...]]})
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

ENV = "SOFTPRUNE_LATENCY_CACHE"
EFFICIENT_GAIN = 0.01   # a narrower point must be this much faster than every wider one
_FLAGS = ("avx512f", "avx512_vnni", "avx512bw", "avx2", "fma", "amx_tile", "asimd", "sve")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """CPU model name and its relevant vector flags (kernels differ by both)."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware", "CPU part") and name == "unknown":
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        import platform
        name = platform.processor() or platform.machine()
    return name + " [" + ",".join(f for f in _FLAGS if f in flags) + "]"


def ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def cache_dir(latency_cache: str | os.PathLike | None = None) -> Path:
    """The cache directory (see the module doc for the order)."""
    if latency_cache:
        return Path(latency_cache).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softprune-fx" / "latency"


def has_tables(latency_cache: str | os.PathLike | None = None) -> bool:
    """Whether the cache folder holds anything: a default prune asks this before it imports
    or builds the latency model (~20 ms and ONNX's import when nothing is cached)."""
    folder = cache_dir(latency_cache)
    return folder.is_dir() and next(folder.iterdir(), None) is not None


class LatencyCache:
    """Tables keyed by ``entry`` dicts plus this runtime's version, threads and CPU."""

    def __init__(self, threads: int | None, latency_cache=None, ort: str | None = None, cpu: str | None = None):
        self.dir = cache_dir(latency_cache)
        self.runtime = {"ort": ort or ort_version(), "threads": int(threads or 0), "cpu": cpu or cpu_model()}

    def key(self, entry: dict) -> str:
        """A stable hash of ``entry`` and the runtime."""
        text = json.dumps({"entry": entry, "runtime": self.runtime}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _path(self, entry: dict) -> Path:
        return self.dir / f"{self.key(entry)}.json"

    def get(self, entry: dict) -> dict | None:
        """The stored value, or None (a missing or unreadable file is a miss)."""
        try:
            with open(self._path(entry)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data.get("value") if data.get("entry") == entry and data.get("runtime") == self.runtime else None

    def put(self, entry: dict, value: dict) -> None:
        """Store atomically (write beside, then rename), so concurrent runs never read half a file."""
        path = self._path(entry)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            with open(tmp, "w") as f:
                json.dump({"entry": entry, "runtime": self.runtime, "value": value}, f)
            os.replace(tmp, path)
        except OSError:  # a read-only cache only costs re-measuring next time
            pass


# ---------------------------------------------------------------------- tables
@dataclass
class Table:
    """Latency over kept (input, output) counts, with 0 ms at 0 channels; bilinear."""

    i_pts: np.ndarray
    o_pts: np.ndarray
    ms: np.ndarray          # [len(i_pts), len(o_pts)]

    @classmethod
    def of(cls, i_pts, o_pts, ms) -> "Table":
        ms = np.asarray(ms, float).reshape(len(i_pts), len(o_pts))
        return cls(np.concatenate([[0.0], i_pts]), np.concatenate([[0.0], o_pts]), np.pad(ms, ((1, 0), (1, 0))))

    @staticmethod
    def _cell(pts: np.ndarray, x: float) -> tuple[int, float]:
        k = int(np.clip(np.searchsorted(pts, x, side="right") - 1, 0, len(pts) - 2)) if len(pts) > 1 else 0
        if len(pts) == 1:
            return 0, 0.0
        return k, (x - pts[k]) / (pts[k + 1] - pts[k])

    def value_grad(self, i: float, o: float) -> tuple[float, float, float]:
        """L(i, o) and its slopes along i and o (bilinear inside a cell; the cell at the
        end extends linearly beyond the measured range)."""
        a, u = self._cell(self.i_pts, i)
        b, v = self._cell(self.o_pts, o)
        m = self.ms
        a1, b1 = min(a + 1, m.shape[0] - 1), min(b + 1, m.shape[1] - 1)
        q00, q01, q10, q11 = m[a, b], m[a, b1], m[a1, b], m[a1, b1]
        val = q00 * (1 - u) * (1 - v) + q10 * u * (1 - v) + q01 * (1 - u) * v + q11 * u * v
        di = max(self.i_pts[a1] - self.i_pts[a], 1e-12)
        do = max(self.o_pts[b1] - self.o_pts[b], 1e-12)
        gi = ((q10 - q00) * (1 - v) + (q11 - q01) * v) / di if a1 != a else 0.0
        go = ((q01 - q00) * (1 - u) + (q11 - q10) * u) / do if b1 != b else 0.0
        return float(val), float(gi), float(go)


def efficient(widths, ms, gain: float = EFFICIENT_GAIN) -> list[int]:
    """Widths faster than every wider one by ``gain`` (the widest always is)."""
    order = np.argsort(widths)
    w, t = np.asarray(widths)[order], np.asarray(ms, float)[order]
    keep, best = [], math.inf
    for k in range(len(w) - 1, -1, -1):
        if t[k] < best * (1 - gain) or not keep:
            keep.append(int(w[k]))
            best = min(best, t[k])
    return sorted(keep)
