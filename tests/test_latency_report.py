"""The CLI's summary table names the unit of the target: latency cut with --target latency."""
from __future__ import annotations

from rich.console import Console

from softprune_fx.cli_prune import summary_table


def _report(**extra) -> dict:
    base = {"spec_given": "model.py:build", "target_ratio": 0.4, "flops_before": 4_000_000,
            "flops_after": 2_500_000, "params_before": 1000, "params_after": 700,
            "latency_ms_before": 10.0, "latency_ms_after": 6.0}
    return {**base, **extra}


def _text(report: dict) -> str:
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    return console.export_text()


def test_flops_mode_title_says_flops_cut():
    text = _text(_report())
    assert "target 40% FLOPs cut" in text and "latency cut" not in text and "predicted" not in text


def test_latency_mode_title_says_latency_cut_and_shows_the_prediction():
    text = _text(_report(target="latency", ort_threads=2, ort_pred_ms_before=9.5, ort_pred_ms_after=5.7,
                         ort_ms_before=10.0, ort_ms_after=6.0))
    assert "target 40% latency cut" in text and "FLOPs cut" not in text
    row = next(line for line in text.splitlines() if "predicted" in line)
    assert "2 threads" in row and "9.500 ms" in row and "5.700 ms" in row and "-40.0%" in row
    one = _text(_report(target="latency", ort_threads=1, ort_pred_ms_before=9.5, ort_pred_ms_after=5.7))
    assert "(1 thread)" in one
