"""The reference training loop: SCP joint training to a FLOPs target, finalize, an
optional fine-tune; a checkpoint every epoch and exact resume; DDP under ``torchrun``.

Example::

    pruned, result, info = train_scp(model, example_inputs, train_loader, val_loader,
                                     ratio=0.4, epochs=15, out_dir="ckpt")
    print(result.achieved_ratio, info["accuracy_masked"], info["accuracy_pruned"])

Batches are ``(input, label, ...)`` and the loss is cross-entropy (classification).
Each epoch's batches come from a ``DistributedSampler`` over the loader's dataset, seeded
by ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one and,
when ``torch.distributed`` is initialised (``torchrun --nproc_per_node N``, gloo on CPU),
each rank reads its own share. The model is then wrapped in ``DistributedDataParallel``,
rank 0's buffers are broadcast before evaluation, checkpoints and finalize, and only rank 0
writes files; every rank returns the same pruned model.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from softprune_fx.passes.errors import SoftpruneError

from .pruner import PruneResult, SoftPruner

__all__ = ["train_scp", "train_plain", "evaluate", "epoch_loader", "world", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
Log = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised.

    Example:
        >>> world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir: Optional[str], state: dict) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically (temp file + rename); rank 0 only."""
    if out_dir is None or world()[0] != 0:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def load_checkpoint(out_dir: Optional[str], config: dict, log: Log = None) -> Optional[dict]:
    """Rank 0's ``out_dir/checkpoint.pt`` (sent to every rank), or None if there is none;
    raises if it was written with another ``config`` (ratio, epochs, seed): no exact resume."""
    rank, size = world()
    path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    state = None
    if rank == 0 and path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    if size > 1:
        box = [state]
        dist.broadcast_object_list(box, 0)
        state = box[0]
    if state is None:
        if log and rank == 0:
            log(f"no checkpoint at {path}; starting from scratch")
        return None
    if state.get("config") != config:
        raise SoftpruneError(f"cannot resume from {path}: it was written with {state.get('config')}, "
                             f"this run asks for {config}")
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    was = model.training
    model.eval()
    dev, correct, total = _device(model), 0, 0
    try:
        for batch in loader:
            x, y = batch[0].to(dev), batch[1].to(dev)
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    finally:
        model.train(was)
    return correct / max(total, 1)


def _fit_epoch(net: nn.Module, batches, opt, sched, bars: _Bars, extra=None, status=None) -> dict:
    """One training epoch; returns the mean cross-entropy and train accuracy over all ranks."""
    dev = _device(net)
    net.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for batch in batches:
        x, y = batch[0].to(dev), batch[1].to(dev)
        out = net(x)
        loss = F.cross_entropy(out, y)
        full = loss + extra() if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        full.backward()
        opt.step()
        sched.step()
        n = y.numel()
        totals += torch.tensor([loss.item() * n, (out.argmax(1) == y).sum().item(), n], dtype=torch.float64)
        text = f"loss {totals[0] / totals[2]:.3f} acc {totals[1] / totals[2]:.3f}"
        bars.step(text + (status() if status is not None else ""))
    if world()[1] > 1:
        dist.all_reduce(totals)
    return {"loss": float(totals[0] / max(totals[2], 1)), "train_acc": float(totals[1] / max(totals[2], 1))}


def _run_epochs(module: nn.Module, train_loader, val_loader, opt, sched, span: range, *, seed: int,
                bars: _Bars, name: str, on_epoch: Callable[[dict], None], extra=None, status=None,
                row_extra=None) -> None:
    """Train ``module`` (DDP-wrapped when distributed) for the epochs in ``span``; after each
    one, evaluate and hand ``{epoch, loss, train_acc, acc, **row_extra()}`` to ``on_epoch``."""
    net = _wrap(module)
    for epoch in span:
        batches = epoch_loader(train_loader, epoch, seed)
        bars.start(f"{name} {epoch + 1}/{span.stop}", len(batches))
        row = {"epoch": epoch + 1, **_fit_epoch(net, batches, opt, sched, bars, extra, status)}
        _sync_buffers(module)
        row["acc"] = evaluate(module, val_loader) if val_loader is not None else None
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
    acc = "-" if row["acc"] is None else f"{row['acc']:.4f}"
    extra = "".join(f" {k} {row[k]:.4f}" for k in ("hard_flops_ratio", "lambda") if k in row)
    return f"{phase} epoch {row['epoch']}: loss {row['loss']:.4f} val acc {acc}{extra}"


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
              log: Log = None) -> tuple[nn.Module, PruneResult, dict]:
    """Train ``model`` jointly with SCP masks to a ``ratio`` FLOPs cut, finalize, fine-tune.

    Loss: cross-entropy + ``pruner.regularization()``; SGD (Nesterov) on
    ``pruner.param_groups``, per-step cosine schedule. ``out_dir`` receives
    ``checkpoint.pt`` after every epoch (SCP and fine-tune phases); ``resume=True``
    continues from it and ends with the same result as an uninterrupted run.
    ``pruner_options`` go to ``SoftPruner`` as they are (``scp``, controller gains, ...).
    Returns ``(pruned, result, info)``; info has ``accuracy_masked`` (hard-masked model
    before finalize), ``accuracy_pruned`` (after finalize and fine-tune), ``history``
    (per SCP epoch: loss, train_acc, acc, hard_flops_ratio, lambda), ``finetune_history``,
    ``seconds`` and ``pruner`` (the SoftPruner, for ``progress()`` / ``hard_keep()``).

    Example:
        >>> pruned, result, info = train_scp(model, (x,), train, val, ratio=0.4, epochs=15)  # doctest: +SKIP
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    config = {"ratio": float(ratio), "epochs": int(epochs), "finetune_epochs": int(finetune_epochs), "seed": int(seed)}
    ckpt = load_checkpoint(out_dir, config, log) if resume else None
    pruner = SoftPruner(model, example_inputs, ratio, strict=strict, frozen=frozen, min_width=min_width,
                        round_to=round_to, allow_inexact=allow_inexact, leaf_modules=leaf_modules,
                        **(pruner_options or {}))
    with _Bars(progress) as bars:
        history, acc_masked = _scp_phase(pruner, train_loader, val_loader, ckpt, config, bars, log, out_dir,
                                         lr=lr, momentum=momentum, weight_decay=weight_decay)
        pruned, result = pruner.finalize()
        ft_lr = lr * 0.1 if finetune_lr is None else finetune_lr
        base = {"config": config, "pruner": pruner.state_dict(), "history": history, "accuracy_masked": acc_masked}
        ft_history = _finetune_phase(pruned, train_loader, val_loader, ckpt, base, bars, log, out_dir,
                                     lr=ft_lr, momentum=momentum, weight_decay=weight_decay)
    _sync_buffers(pruned)
    acc_pruned = evaluate(pruned, val_loader) if val_loader is not None else None
    info = {"accuracy_masked": acc_masked, "accuracy_pruned": acc_pruned, "history": history,
            "finetune_history": ft_history, "seconds": time.perf_counter() - start, "pruner": pruner}
    return pruned, result, info


def _scp_phase(pruner: SoftPruner, train_loader, val_loader, ckpt, config, bars, log, out_dir, *,
               lr, momentum, weight_decay) -> tuple[list, Optional[float]]:
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
                name="scp", on_epoch=on_epoch, extra=pruner.regularization,
                status=lambda: f" hard {float(bank.hard_ratio):.3f} lam {float(bank.lam):.4f}")
    _sync_buffers(pruner.model)
    acc = evaluate(pruner.model, val_loader) if val_loader is not None else None
    return history, acc


def _finetune_phase(pruned: nn.Module, train_loader, val_loader, ckpt, base: dict, bars, log, out_dir, *,
                    lr, momentum, weight_decay) -> list:
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
                bars=bars, name="finetune", on_epoch=on_epoch)
    return history
