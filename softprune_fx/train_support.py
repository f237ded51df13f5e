"""What the training loop needs besides epochs: losses, metrics, batches, loaders, modes.

The loader contract: each batch is ``(input, target, ...)`` (extra items ignored). The
input is a tensor, or a tuple/list of tensors passed as positional arguments; the target
is anything the loss accepts (a tensor, a dict of tensors, ...); both are moved to the
model's device. ``loss(output, target)`` returns a scalar tensor, ``metric(output,
target)`` a number (higher is better), averaged over samples (each batch weighted by
its input's first dimension).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from softprune_fx.passes.errors import SoftpruneError


def to_device(obj: Any, dev: torch.device) -> Any:
    """Tensors inside tuples, lists and dicts moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, dev) for v in obj) if not hasattr(obj, "_fields") else obj
    return obj


def split_batch(batch: Any, dev: torch.device) -> tuple[tuple, Any, int]:
    """``(model inputs, target, batch size)`` of one ``(input, target, ...)`` batch."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise SoftpruneError("a training batch must be (input, target, ...) (see the loader contract)")
    x, y = to_device(batch[0], dev), to_device(batch[1], dev)
    inputs = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
    return inputs, y, int(n)


def cross_entropy(output, target) -> torch.Tensor:
    return F.cross_entropy(output, target)


def accuracy(output, target) -> float:
    """Top-1 accuracy of logits ``output`` (N, classes) against integer labels."""
    if not isinstance(output, torch.Tensor):
        raise SoftpruneError(f"the default metric (accuracy) needs a logits tensor, the model returned a "
                             f"{type(output).__name__}: pass --metric file.py:function")
    return float((output.argmax(1) == target).double().mean())


@dataclass
class Objective:
    """The loss to train and the metric to report (``metric_name`` goes into report.json)."""

    loss: Callable[[Any, Any], torch.Tensor] = cross_entropy
    metric: Callable[[Any, Any], float] | None = accuracy
    metric_name: str = "accuracy"

    @classmethod
    def make(cls, loss=None, metric=None, loss_name: str | None = None, metric_name: str | None = None):
        """Defaults: cross-entropy and accuracy; a custom loss without a metric reports -loss."""
        if metric is not None:
            return cls(loss or cross_entropy, metric, metric_name or getattr(metric, "__name__", "metric"))
        if loss is not None:
            return cls(loss, None, f"-loss ({loss_name or getattr(loss, '__name__', 'loss')})")
        return cls()

    def score(self, output, target) -> float:
        if self.metric is None:
            return -float(self.loss(output, target))
        return float(self.metric(output, target))


@torch.no_grad()
def evaluate_metric(model: nn.Module, loader, objective: Objective) -> float | None:
    """The objective's metric of ``model`` in eval mode over ``loader`` (mode restored)."""
    if loader is None:
        return None
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    total, count = 0.0, 0
    try:
        for batch in loader:
            inputs, y, n = split_batch(batch, dev)
            total += objective.score(model(*inputs), y) * n
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def rebatch(loader, batch_size: int | None):
    """``loader`` over the same dataset with another batch size (map-style datasets only)."""
    if batch_size is None or getattr(loader, "batch_size", None) == batch_size:
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or isinstance(loader.dataset, IterableDataset):
        raise SoftpruneError("--batch-size needs DataLoaders over map-style datasets with a plain batch_size; "
                             "this loader has none (set the batch size in your loaders function)")
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=isinstance(loader.sampler, RandomSampler),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn)


# --------------------------------------------------------------------------- train vs eval graphs
def mode_analyses(model: nn.Module, inputs: tuple, options: dict, eval_analysis=None):
    """``(train_analysis, eval_analysis, branches)``: the model traced in both modes.

    ``branches`` is True when the two graphs differ (the forward reads ``self.training``
    beyond module calls: a detector head returning raw maps in training); then the masked
    model is trained on the training-mode graph and the result pruned on the eval one.
    """
    from .api import analyze

    was = model.training
    try:
        model.eval()
        cg_eval = eval_analysis if eval_analysis is not None else analyze(model, inputs, **options)
        model.train()
        try:
            cg_train = analyze(model, inputs, **options)
        except Exception:  # noqa: BLE001 - e.g. BatchNorm refuses a batch of 1 in training mode
            return cg_eval, cg_eval, False  # then the masked model is the eval-mode graph, as before
    finally:
        model.train(was)
    branches = cg_train.gm.code != cg_eval.gm.code
    return (cg_train if branches else cg_eval), cg_eval, branches


def eval_result(model: nn.Module, trained: nn.Module, cg_eval, pruned_train: nn.Module, result):
    """The pruned model of the eval-mode graph, with the weights ``trained`` (the masked
    model's base) and ``pruned_train`` (after fine-tuning) learnt on the training-mode graph."""
    from softprune_fx.onnx_check import max_abs_diff
    from softprune_fx.passes.flops import count_graph_flops, count_params

    from .api import analyze

    twin = copy.deepcopy(model).eval()
    _load_shared(twin, trained.state_dict(), "the trained masked model")
    cg = analyze(twin, cg_eval.inputs, **cg_eval.options)
    missing = sorted(set(result.drop) - set(cg.by_id))
    if missing:
        raise SoftpruneError(f"the eval-mode graph has no group {missing[0]!r} of the training-mode graph: "
                             "this model cannot be trained and pruned in different modes")
    pruned = cg.prune(result.drop)
    _load_shared(pruned, pruned_train.state_dict(), "the fine-tuned pruned model")
    reference = cg.masked(result.drop, share_weights=True)
    with torch.no_grad():
        pruned.eval()
        diff = max_abs_diff(reference.eval()(*cg.inputs), pruned(*cg.inputs))
    flops_before, flops_after = cg.flops, count_graph_flops(pruned, cg.inputs)
    new = dataclasses.replace(result, flops_before=flops_before, flops_after=flops_after,
                              params_before=count_params(twin), params_after=count_params(pruned),
                              achieved_ratio=1.0 - flops_after / flops_before, max_abs_diff=diff)
    new.analysis = cg
    return pruned, new


def _load_shared(target: nn.Module, state: dict, what: str) -> None:
    """Copy the entries of ``state`` that ``target`` has (same shapes required)."""
    own = target.state_dict()
    shared = {k: v for k, v in state.items() if k in own}
    bad = [k for k, v in shared.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad or not shared:
        raise SoftpruneError(f"cannot carry the weights of {what} to the eval-mode graph ({bad[:3]})")
    target.load_state_dict(shared, strict=False)
