"""The closed loop of ``target="latency"``: decide, measure original and pruned in ORT
interleaved, refit the latency model on the measurements and decide again.

Example::

    pruned, result = close_loop(finish, lat, model, inputs, ratio=0.4)
"""
from __future__ import annotations

import numpy as np

from .latency_timing import measure_models

LOOP_TOL = 0.01


def _finish_reachable(finish, goal: float):
    """``finish(goal)``, lowering the goal by 5 points (at most 4 times) while the predicted
    latency cannot reach it: the first measurement then recalibrates the model."""
    from softprune_fx.passes.errors import BudgetError
    for _ in range(4):
        try:
            return finish(goal), goal
        except BudgetError:
            goal -= 0.05
    return finish(goal), goal


def close_loop(finish, cost, model, inputs, ratio: float, rounds: int = 2, tol: float = LOOP_TOL):
    """Decide (``finish(goal) -> (pruned, result)``), measure original and pruned
    interleaved, and while the measured cut misses ``ratio`` by more than ``tol`` (at most
    ``rounds`` more times) refit the model's scale and constant on the measurements, move
    the goal by what the refit model still misses, and decide again; the measured-closest
    result wins. Fills the result's latency fields (achieved/target: latency fractions;
    the prediction reported is the one the kept result was decided on)."""
    goal, best, history, observed = ratio, None, [], [(np.ones(cost.index.size), cost.measured0)]
    for r in range(rounds + 1):
        (pruned, result), goal = _finish_reachable(finish, goal)
        keep = cost.index.keep_from_drop(result.drop)
        pred0, pred1 = cost.total0, cost.flops(keep)
        stats = measure_models({"orig": model, "pruned": pruned}, inputs, cost.threads, timer=cost.timer)
        m0, m1 = stats["orig"][0], stats["pruned"][0]
        cut = 1.0 - m1 / m0
        history.append({"goal": round(goal, 4), "predicted_cut": round(1 - pred1 / pred0, 4),
                        "measured_cut": round(cut, 4), "ms_before": round(m0, 4), "ms_after": round(m1, 4)})
        if best is None or abs(cut - ratio) < abs(best[2] - ratio):
            best = (pruned, result, cut, m0, m1, pred0, pred1)
        if abs(cut - ratio) <= tol or r == rounds:
            break
        observed.append((keep, cost.measured0 * m1 / m0))  # this run's fraction, on the calibrated scale
        cost.refit(observed)
        goal = float(np.clip(ratio + (cost.ratio(keep) - cut), 0.01, 0.95))
    pruned, result, cut, m0, m1, pred0, pred1 = best
    result.flops_ratio = result.achieved_ratio
    result.target, result.ort_threads = "latency", cost.threads
    result.target_ratio, result.achieved_ratio = ratio, cut
    result.ort_ms_before, result.ort_ms_after = m0, m1
    result.ort_pred_ms_before, result.ort_pred_ms_after = pred0, pred1
    result.ort_pred_error = pred1 / m1 - 1.0
    result.ort_pred_cut = 1.0 - pred1 / pred0
    result.ort_pred_error_rel = (pred1 / pred0) / (m1 / m0) - 1.0  # load drift since calibration cancels
    result.latency_rounds = history
    return pruned, result
