"""Shared helpers for the benchmark scripts: paths, machine info, timing, JSON, tables."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 180)


def machine() -> dict:
    """Cores, CPU model, load average, versions: recorded with every result file."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())}
    try:
        import torch_pruning
        info["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """Seconds for one call (after a gc.collect(); the collector stays on while timing)."""
    gc.collect()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def med(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> float:
    """(p90 - p10) / median: the relative spread of repeated timings."""
    xs = sorted(xs)
    if len(xs) < 2:
        return 0.0
    lo, hi = xs[int(0.1 * (len(xs) - 1))], xs[int(round(0.9 * (len(xs) - 1)))]
    return (hi - lo) / max(statistics.median(xs), 1e-12)


def fit_exponent(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    import numpy as np
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    console.print(f"wrote {path.relative_to(ROOT)}")
    return path
