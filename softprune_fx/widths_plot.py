"""``widths.png``: channels per group before and after pruning, one bar pair per group."""
from __future__ import annotations

from pathlib import Path

MANY = 12  # more groups than this: horizontal bars, one row per group


def plot_widths(path: Path, groups: list[dict]) -> str:
    """Bar pairs (before, after) per group with their numbers; returns "written" or why not."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'softprune-fx[plot]')"
    rows = [g for g in groups if g["width_before"] > 1] or groups
    if not rows:
        return "skipped: no channel groups"
    horizontal = len(rows) > MANY
    n = len(rows)
    size = (8.0, min(60.0, 1.2 + 0.32 * n)) if horizontal else (max(6.0, 0.9 * n + 2), 4.5)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    pos = list(range(n))
    before = [g["width_before"] for g in rows]
    after = [g["width_after"] for g in rows]
    labels = [g["id"] for g in rows]
    bar = ax.barh if horizontal else ax.bar
    step = 0.4
    b1 = bar([p - step / 2 for p in pos], before, step, color="#b0b0b0", label="before")
    b2 = bar([p + step / 2 for p in pos], after, step, color="#1f77b4", label="after")
    for bars in (b1, b2):
        ax.bar_label(bars, padding=2, fontsize=8)
    if horizontal:
        ax.set_yticks(pos, labels, fontsize=9)
        ax.invert_yaxis()  # first group on top, as in the tables
        ax.set_xlabel("channels")
        ax.margins(x=0.12)
    else:
        ax.set_xticks(pos, labels, rotation=30, ha="right", fontsize=9)
        ax.set_ylabel("channels")
        ax.margins(y=0.12)
    ax.set_title("channels per group, before and after pruning")
    ax.legend(loc="lower right" if horizontal else "upper left")
    fig.savefig(path, dpi=100)
    return "written"
