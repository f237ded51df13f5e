"""The reference training loop: SCP joint training to a FLOPs target, finalize, an
optional fine-tune; a checkpoint every epoch and exact resume; DDP under ``torchrun``.

Example::

    pruned, result, info = train_scp(model, example_inputs, train_loader, val_loader,
                                     ratio=0.4, epochs=15, out_dir="ckpt")
    print(result.achieved_ratio, info["accuracy_masked"], info["accuracy_pruned"])

Batches follow the loader contract of ``train_support`` (``(input, target, ...)``); the
loss and metric default to cross-entropy and top-1 accuracy (``objective=`` changes both).
Each epoch's batches come from a ``DistributedSampler`` over the loader's dataset, seeded
by ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one and,
when ``torch.distributed`` is initialised (``torchrun --nproc_per_node N``, gloo on CPU),
each rank reads its own share. The model is then wrapped in ``DistributedDataParallel``,
rank 0's buffers are broadcast before evaluation, checkpoints and finalize, and only rank 0
writes files; every rank returns the same pruned model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from .checkpoints import CHECKPOINT, _rng_state, _set_rng_state, load_checkpoint, save_checkpoint, world  # noqa: F401
from .pruner import PruneResult, SoftPruner
from .train_support import Objective, eval_result, evaluate_metric, mode_analyses, split_batch

__all__ = ["train_scp", "train_plain", "evaluate", "epoch_loader", "world", "CHECKPOINT"]

Log = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- distributed


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync_buffers(module: nn.Module) -> None:
    """Broadcast rank 0's buffers: BN running statistics drift apart across ranks."""
    if world()[1] > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def _wrap(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` itself."""
    if world()[1] == 1:
        return module
    dev = _device(module)
    return DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)


def epoch_loader(loader: DataLoader, epoch: int, seed: int = 0) -> DataLoader:
    """This rank's batches for ``epoch``, in an order fixed by ``(seed, epoch)``.

    Rebuilds ``loader`` over its dataset with a ``DistributedSampler`` (shuffled iff the
    loader shuffles). Loaders it cannot rebuild (iterable datasets, custom batch
    samplers) are returned unchanged.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> [b[1].tolist() for b in epoch_loader(DataLoader(ds, batch_size=4), 0)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    ds = loader.dataset
    if loader.batch_size is None or isinstance(ds, IterableDataset):
        return loader
    rank, size = world()
    sampler = DistributedSampler(ds, num_replicas=size, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(ds, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn)


# --------------------------------------------------------------------------- epochs


class _Bars:
    """Rich progress bars (rank 0 only, stderr): one per epoch with loss, acc and extras."""

    def __init__(self, enabled: bool):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), disable=not enabled or world()[0] != 0)
        self.task = None

    def __enter__(self) -> "_Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=total, stats="")

    def step(self, stats: str) -> None:
        self.progress.update(self.task, advance=1, stats=stats)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` in eval mode (its mode is restored afterwards).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.eye(3), torch.arange(3))
        >>> evaluate(nn.Identity(), DataLoader(ds, batch_size=2))
        1.0
    """
    return evaluate_metric(model, loader, Objective())


def _fit_epoch(net: nn.Module, batches, opt, sched, bars: _Bars, objective: Objective, extra=None,
               status=None) -> dict:
    """One training epoch; returns the mean loss and train metric over all ranks."""
    dev = _device(net)
    net.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, metric sum, count
    for batch in batches:
        inputs, y, n = split_batch(batch, dev)
        out = net(*inputs)
        loss = objective.loss(out, y)
        full = loss + extra() if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        full.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            score = -loss.item() if objective.metric is None else objective.score(out, y)
        totals += torch.tensor([loss.item() * n, score * n, n], dtype=torch.float64)
        text = f"loss {totals[0] / totals[2]:.3f} metric {totals[1] / totals[2]:.3f}"
        bars.step(text + (status() if status is not None else ""))
    if world()[1] > 1:
        dist.all_reduce(totals)
    return {"loss": float(totals[0] / max(totals[2], 1)), "train_acc": float(totals[1] / max(totals[2], 1))}


def _run_epochs(module: nn.Module, train_loader, val_loader, opt, sched, span: range, *, seed: int,
                bars: _Bars, name: str, on_epoch: Callable[[dict], None], extra=None, status=None,
                row_extra=None, objective: Objective = Objective()) -> None:
    """Train ``module`` (DDP-wrapped when distributed) for the epochs in ``span``; after each
    one, evaluate and hand ``{epoch, loss, train_acc, acc, **row_extra()}`` to ``on_epoch``."""
    net = _wrap(module)
    for epoch in span:
        batches = epoch_loader(train_loader, epoch, seed)
        bars.start(f"{name} {epoch + 1}/{span.stop}", len(batches))
        row = {"epoch": epoch + 1, "epochs": span.stop,
               **_fit_epoch(net, batches, opt, sched, bars, objective, extra, status)}
        _sync_buffers(module)
        row["acc"] = evaluate_metric(module, val_loader, objective)
        row["metric"] = objective.metric_name
        row.update(row_extra() if row_extra is not None else {})
        on_epoch(row)


def plain_param_groups(model: nn.Module, weight_decay: float = 1e-4) -> list[dict]:
    """SGD groups: weight decay on everything except norm-layer biases (as SCP's beta).

    Example:
        >>> [len(g["params"]) for g in plain_param_groups(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))]
        [3, 1]
    """
    no = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no], "weight_decay": 0.0}]


def _optimizer(groups, lr: float, momentum: float, total_steps: int):
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))


def _line(phase: str, row: dict) -> str:
    """``scp epoch 2/15: loss 0.4123 val accuracy 0.9012 hard FLOPs ratio 0.3950 lambda 0.0021``."""
    acc = "-" if row["acc"] is None else f"{row['acc']:.4f}"
    extra = "".join(f" {label} {row[k]:.4f}" for k, label in (("hard_flops_ratio", "hard FLOPs ratio"),
                                                               ("lambda", "lambda")) if k in row)
    of = f"/{row['epochs']}" if "epochs" in row else ""
    return f"{phase} epoch {row['epoch']}{of}: loss {row['loss']:.4f} val {row.get('metric', 'acc')} {acc}{extra}"


# --------------------------------------------------------------------------- entry points


def train_plain(model: nn.Module, train_loader, val_loader, epochs: int, *, lr: float = 0.1,
                momentum: float = 0.9, weight_decay: float = 1e-4, seed: int = 0, progress: bool = True,
                log: Log = None) -> tuple[nn.Module, dict]:
    """Train ``model`` in place without masks (the unpruned baseline): same SGD and cosine
    schedule as ``train_scp``. Returns ``(model, {accuracy, history, seconds})``.

    Example:
        >>> model, info = train_plain(model, train_loader, val_loader, epochs=15)  # doctest: +SKIP
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    opt, sched = _optimizer(plain_param_groups(model, weight_decay), lr, momentum,
                            epochs * len(epoch_loader(train_loader, 0, seed)))
    history: list[dict] = []

    def on_epoch(row):
        history.append(row)
        if log:
            log(_line("plain", row))

    with _Bars(progress) as bars:
        _run_epochs(model, train_loader, val_loader, opt, sched, range(epochs), seed=seed, bars=bars,
                    name="train", on_epoch=on_epoch)
    acc = history[-1]["acc"] if history else (evaluate(model, val_loader) if val_loader is not None else None)
    return model, {"accuracy": acc, "history": history, "seconds": time.perf_counter() - start}


def train_scp(model: nn.Module, example_inputs: Any, train_loader, val_loader, *, ratio: float, epochs: int,
              finetune_epochs: int = 0, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
              finetune_lr: Optional[float] = None, out_dir: Optional[str] = None, resume: bool = False,
              seed: int = 0, strict: bool = False, allow_inexact: bool = False, round_to="auto", min_width=1,
              frozen=(), leaf_modules=(), pruner_options: Optional[dict] = None, progress: bool = True,
              log: Log = None, objective: Optional[Objective] = None,
              analysis=None) -> tuple[nn.Module, PruneResult, dict]:
    """Train ``model`` jointly with SCP masks to a ``ratio`` FLOPs cut, finalize, fine-tune.

    Loss: ``objective.loss`` (default cross-entropy) + ``pruner.regularization()``; SGD
    (Nesterov) on ``pruner.param_groups``, per-step cosine schedule. ``out_dir`` receives
    ``checkpoint.pt`` after every epoch (SCP and fine-tune phases); ``resume=True``
    continues from it and ends with the same result as an uninterrupted run.
    ``pruner_options`` go to ``SoftPruner`` as they are (``scp``, controller gains, ...).
    ``analysis`` is the eval-mode analysis of ``model`` if one was made already. A forward
    that reads ``self.training`` is traced in both modes: the masked model trains on the
    training-mode graph, the result is pruned on the eval-mode graph (``info["traced"]``).
    Returns ``(pruned, result, info)``; info has ``metric`` (its name), ``metric_before``
    (the unpruned model), ``metric_masked`` (hard-masked, before finalize),
    ``metric_pruned`` (after finalize and fine-tune), for accuracy also ``accuracy_masked``
    / ``accuracy_pruned``, ``history`` (per SCP epoch: loss, train metric, acc,
    hard_flops_ratio, lambda), ``finetune_history``, ``seconds``, ``resumed_from`` and
    ``pruner`` (the SoftPruner, for ``progress()`` / ``hard_keep()``).

    Example:
        >>> pruned, result, info = train_scp(model, (x,), train, val, ratio=0.4, epochs=15)  # doctest: +SKIP
    """
    start = time.perf_counter()
    objective = objective or Objective()
    torch.manual_seed(seed)
    config = {"ratio": float(ratio), "epochs": int(epochs), "finetune_epochs": int(finetune_epochs),
              "seed": int(seed), "lr": float(lr)}
    ckpt = load_checkpoint(out_dir, config, log) if resume else None
    options = dict(frozen=frozen, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with torch.random.fork_rng(devices=[]):  # the seeded run draws the same numbers with or without these
        metric_before = evaluate_metric(model, val_loader, objective)
        cg_train, cg_eval, branches = mode_analyses(model, inputs, options, analysis)
    was = model.training
    model.train(branches)  # the masked model copies the mode of the graph it was traced in
    try:
        steps = {"total_steps": epochs * len(epoch_loader(train_loader, 0, seed))}  # the controller's schedule
        pruner = SoftPruner(model, inputs, ratio, strict=strict, min_width=min_width, round_to=round_to,
                            analysis=cg_train, **options, **{**steps, **(pruner_options or {})})
    finally:
        model.train(was)
    if ckpt is not None and log:
        done = ckpt["epoch"] if ckpt["phase"] == "scp" else epochs
        log(f"resuming from {Path(out_dir) / CHECKPOINT}: {ckpt['phase']} epoch {ckpt['epoch']} done, "
            f"continuing at {'scp' if ckpt['phase'] == 'scp' else 'finetune'} epoch {ckpt['epoch'] + 1}"
            + ("" if ckpt["phase"] == "finetune" or done < epochs else " (finalize next)"))
    with _Bars(progress) as bars:
        history, acc_masked = _scp_phase(pruner, train_loader, val_loader, ckpt, config, bars, log, out_dir,
                                         lr=lr, momentum=momentum, weight_decay=weight_decay, objective=objective)
        pruned, result = pruner.finalize()
        ft_lr = lr * 0.1 if finetune_lr is None else finetune_lr
        base = {"config": config, "pruner": pruner.state_dict(), "history": history, "accuracy_masked": acc_masked}
        ft_history = _finetune_phase(pruned, train_loader, val_loader, ckpt, base, bars, log, out_dir,
                                     lr=ft_lr, momentum=momentum, weight_decay=weight_decay, objective=objective)
    if branches:
        pruned, result = eval_result(model, pruner.base, cg_eval, pruned, result)
    _sync_buffers(pruned)
    acc_pruned = evaluate_metric(pruned, val_loader, objective)
    info = {"metric": objective.metric_name, "metric_before": metric_before, "metric_masked": acc_masked,
            "metric_pruned": acc_pruned, "history": history, "finetune_history": ft_history,
            "traced": {"masked_model": "train" if branches else "eval", "pruned_model": "eval",
                       "forward_reads_self_training": branches},
            "resumed_from": None if ckpt is None else f"{ckpt['phase']} epoch {ckpt['epoch']}",
            "seconds": time.perf_counter() - start, "pruner": pruner}
    if objective.metric_name == "accuracy":
        info.update(accuracy_masked=acc_masked, accuracy_pruned=acc_pruned)
    return pruned, result, info


def _scp_phase(pruner: SoftPruner, train_loader, val_loader, ckpt, config, bars, log, out_dir, *,
               lr, momentum, weight_decay, objective: Objective) -> tuple[list, Optional[float]]:
    """The SCP epochs (from the checkpoint's, if any); returns (history, masked accuracy)."""
    epochs, seed = config["epochs"], config["seed"]
    opt, sched = _optimizer(pruner.param_groups(weight_decay), lr, momentum,
                            epochs * len(epoch_loader(train_loader, 0, seed)))
    history, first = [], 0
    if ckpt is not None:
        pruner.load_state_dict(ckpt["pruner"])
        history = list(ckpt["history"])
        if ckpt["phase"] == "finetune":
            return history, ckpt["accuracy_masked"]
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        first = ckpt["epoch"]
        _set_rng_state(ckpt["rng"])
    bank = pruner.bank

    def on_epoch(row):
        p = pruner.progress()
        row.update(hard_flops_ratio=p["hard_flops_ratio"], **{"lambda": p["lambda"]})
        history.append(row)
        if log:
            log(_line("scp", row))
        save_checkpoint(out_dir, {"config": config, "phase": "scp", "epoch": row["epoch"],
                                  "pruner": pruner.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history})

    _run_epochs(pruner.model, train_loader, val_loader, opt, sched, range(first, epochs), seed=seed, bars=bars,
                name="scp", on_epoch=on_epoch, extra=pruner.regularization, objective=objective,
                status=lambda: f" hard {float(bank.hard_ratio):.3f} lam {float(bank.lam):.4f}")
    _sync_buffers(pruner.model)
    return history, evaluate_metric(pruner.model, val_loader, objective)


def _finetune_phase(pruned: nn.Module, train_loader, val_loader, ckpt, base: dict, bars, log, out_dir, *,
                    lr, momentum, weight_decay, objective: Objective) -> list:
    """Fine-tune the pruned model (plain cross-entropy), resuming from a fine-tune checkpoint."""
    config = base["config"]
    epochs, seed = config["finetune_epochs"], config["seed"]
    if epochs <= 0:
        return []
    opt, sched = _optimizer(plain_param_groups(pruned, weight_decay), lr, momentum,
                            epochs * len(epoch_loader(train_loader, 0, seed)))
    history, first = [], 0
    if ckpt is not None and ckpt["phase"] == "finetune":
        pruned.load_state_dict(ckpt["pruned"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, first = list(ckpt["finetune_history"]), ckpt["epoch"]
        _set_rng_state(ckpt["rng"])

    def on_epoch(row):
        history.append(row)
        if log:
            log(_line("finetune", row))
        save_checkpoint(out_dir, {**base, "phase": "finetune", "epoch": row["epoch"], "pruned": pruned.state_dict(),
                                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                  "rng": _rng_state(), "finetune_history": history})

    # fine-tune epochs draw their own batch order: seed offset keeps it apart from the SCP epochs'
    _run_epochs(pruned, train_loader, val_loader, opt, sched, range(first, epochs), seed=seed + 1000003,
                bars=bars, name="finetune", on_epoch=on_epoch, objective=objective)
    return history
