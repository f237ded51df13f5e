"""The reference training loop: exact checkpoint/resume, DDP under torchrun (2 real
processes, gloo), and the budget controller reaching the target on zoo architectures.

Also runnable as the DDP worker: ``torchrun --nproc_per_node 2 tests/test_train.py --worker DIR``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from softprune_fx.train import CHECKPOINT, epoch_loader, evaluate, train_scp

RATIO = 0.4


class Tiny(nn.Module):
    """Stem conv-BN-ReLU, one post-activation residual block, a strided conv, pool, fc."""

    def __init__(self, w: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.fc = nn.Linear(2 * w, 4)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(F.adaptive_avg_pool2d(self.down(x), 1).flatten(1))


def tiny_setup(n: int = 48, size: int = 8, seed: int = 0):
    """(model, example_inputs, train_loader, val_loader): 4 classes from input statistics."""
    torch.manual_seed(seed)
    model = Tiny()
    x = torch.randn(n, 3, size, size)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    return model, (x[:2],), train, val


def synthetic_loaders(shape, n: int = 32, classes: int = 10, batch_size: int = 8, seed: int = 0):
    """Random inputs of ``shape[1:]``, labels from the sign pattern of channel means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape[1:]), generator=g)
    y = (x.flatten(2).mean(2)[:, :4] > 0).long() @ torch.tensor([1, 2, 4, 8])[: min(4, shape[1])] % classes
    return (DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x, y), batch_size=n))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def _interrupt_at(prefix: str):
    """A ``log`` callback that stops training when a line starts with ``prefix`` (before
    that epoch's checkpoint is written), as a crash would."""
    def log(line: str) -> None:
        if line.startswith(prefix):
            raise Interrupt(line)
    return log


# --------------------------------------------------------------------------- checkpoint / resume


@pytest.mark.parametrize("stop_at", ["scp epoch 3", "finetune epoch 2"])
def test_resume_equals_uninterrupted(tmp_path, stop_at):
    model, inputs, train, val = tiny_setup()
    kw = dict(ratio=RATIO, epochs=4, finetune_epochs=2, seed=3, progress=False)
    ref, ref_result, ref_info = train_scp(model, inputs, train, val, out_dir=str(tmp_path / "a"), **kw)

    with pytest.raises(Interrupt):
        train_scp(model, inputs, train, val, out_dir=str(tmp_path / "b"), log=_interrupt_at(stop_at), **kw)
    saved = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert (saved["phase"], saved["epoch"]) == (("scp", 2) if stop_at.startswith("scp") else ("finetune", 1))
    lines: list[str] = []
    got, result, info = train_scp(model, inputs, train, val, out_dir=str(tmp_path / "b"), resume=True,
                                  log=lines.append, **kw)
    assert lines[0].startswith("resuming from") and "continuing at " + stop_at in lines[0]
    assert lines[1].startswith(stop_at)  # it went on from the checkpoint, not from scratch

    assert result.drop == ref_result.drop and result.widths == ref_result.widths
    assert (info["pruner"].hard_keep() == ref_info["pruner"].hard_keep()).all()
    assert _same_state(got.state_dict(), ref.state_dict())
    assert _same_state(info["pruner"].model.state_dict(), ref_info["pruner"].model.state_dict())
    assert info["history"] == ref_info["history"]
    assert info["finetune_history"] == ref_info["finetune_history"]
    assert info["accuracy_pruned"] == ref_info["accuracy_pruned"] == evaluate(ref, val)
    assert not [p for p in (tmp_path / "b").iterdir() if p.name != CHECKPOINT]  # no temp files left


def test_resume_rejects_other_settings(tmp_path):
    model, inputs, train, val = tiny_setup()
    train_scp(model, inputs, train, val, ratio=RATIO, epochs=1, progress=False, out_dir=str(tmp_path))
    with pytest.raises(Exception, match="cannot resume"):
        train_scp(model, inputs, train, val, ratio=0.3, epochs=1, progress=False, out_dir=str(tmp_path),
                  resume=True)


def test_epoch_loader_fixed_order_and_split():
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    first = [b[1].tolist() for b in epoch_loader(loader, 0, seed=1)]
    assert first == [b[1].tolist() for b in epoch_loader(loader, 0, seed=1)]
    assert first != [b[1].tolist() for b in epoch_loader(loader, 1, seed=1)]
    assert sorted(sum(first, [])) == list(range(10))


# --------------------------------------------------------------------------- DDP


def ddp_worker(out: Path) -> None:
    """One torchrun process: train the tiny model with SCP under DDP (each rank names its own
    out_dir, so the test sees who wrote), save what it ended with, then resume from the end."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, inputs, train, val = tiny_setup()
    pruned, result, info = train_scp(model, inputs, train, val, ratio=RATIO, epochs=2, finetune_epochs=1, seed=0,
                                     out_dir=str(out / f"ckpt{rank}"), progress=False)
    pruner = info["pruner"]
    torch.save({"lambda": float(pruner.bank.lam), "keep": torch.as_tensor(pruner.hard_keep()),
                "steps": pruner.progress()["step"], "pruned": pruned.state_dict(), "drop": result.drop,
                "history": info["history"], "acc": info["accuracy_pruned"],
                "batches": len(epoch_loader(train, 0))}, out / f"rank{rank}.pt")
    # resume: rank 1 has no checkpoint of its own and must use rank 0's
    again, _, _ = train_scp(model, inputs, train, val, ratio=RATIO, epochs=2, finetune_epochs=1, seed=0,
                            out_dir=str(out / f"ckpt{rank}"), resume=True, progress=False)
    torch.save(again.state_dict(), out / f"resumed{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["batches"] == r1["batches"] == 3  # 48 samples, batch 8: 3 batches per rank
    assert r0["steps"] == r1["steps"] == 2 * 3
    assert r0["lambda"] == r1["lambda"] and r0["lambda"] > 0
    assert torch.equal(r0["keep"], r1["keep"])
    assert r0["drop"] == r1["drop"]
    assert _same_state(r0["pruned"], r1["pruned"])
    assert r0["history"] == r1["history"] and r0["acc"] == r1["acc"]
    for r in (0, 1):
        assert _same_state(torch.load(tmp_path / f"resumed{r}.pt", weights_only=True), r0["pruned"])
    assert (tmp_path / "ckpt0" / CHECKPOINT).is_file()
    assert not (tmp_path / "ckpt1").exists()


# --------------------------------------------------------------------------- controller on the zoo


# SiLU channels must travel to beta < -4.5 before the first one dies: 240 steps reach 0.30 only
# (and train_scp's total_steps schedule, ramp over half the run, 0.386 in 480: not listed there)
EPOCHS = {"resnet_silu": 60}


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "resnet_bottleneck",
                                  "preact_resnet", "mobilenetv2", "convnext_ln"])
def test_controller_reaches_target(name):
    """The hard-rule cut reaches the target during a short run; finalize lands within 1 point.
    32 random inputs of the model's example shape, batch 4, 30 epochs (240 steps)."""
    from zoo import ZOO

    model, inputs = ZOO[name]()
    model.train()
    train, val = synthetic_loaders(inputs[0].shape, batch_size=4)
    epochs = EPOCHS.get(name, 30)
    pruned, result, info = train_scp(model, inputs, train, val, ratio=RATIO, epochs=epochs, lr=0.1, seed=0,
                                     progress=False)
    reached = max(h["hard_flops_ratio"] for h in info["history"])
    assert reached >= RATIO - 0.01, [(round(h["hard_flops_ratio"], 3), h["lambda"]) for h in info["history"]]
    assert abs(result.achieved_ratio - RATIO) <= 0.01
    assert result.max_abs_diff < 1e-4


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet_silu", "resnet_gelu", "convnext_ln"])
def test_controller_lands_in_a_plain_user_loop(name):
    """The README's loop, nothing but forwards (no total_steps): 240 steps, cosine lr. The
    hard-rule cut at the end is near the target (not an overshoot finalize repairs) and
    finalize warns of no shortfall."""
    import warnings

    import softprune_fx as sp
    from zoo import ZOO

    model, inputs = ZOO[name]()
    torch.manual_seed(0)
    train, _ = synthetic_loaders(inputs[0].shape, batch_size=4)
    pruner = sp.SoftPruner(model, inputs, RATIO)
    net = pruner.model.train()
    opt = torch.optim.SGD(pruner.param_groups(1e-4), lr=0.1, momentum=0.9)
    epochs = EPOCHS.get(name, 30)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train))
    cuts = []
    for _ in range(epochs):
        for x, y in train:
            loss = F.cross_entropy(net(x), y) + pruner.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        cuts.append(round(pruner.progress()["hard_flops_ratio"], 3))
    assert RATIO - 0.05 - 1e-9 <= cuts[-1] <= RATIO + 0.05, cuts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no training_shortfall warning
        _, result = pruner.finalize()
    assert result.training_shortfall is None and abs(result.achieved_ratio - RATIO) <= 0.015


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    ddp_worker(Path(sys.argv[2]))
