"""End-to-end CLI tests of issue 13, part two: plain progress logs, training options
(--loss, --metric, --lr, --batch-size, self.training models), Ctrl-C and --resume, early
one-line errors. The model file is test_cli_trust.py's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprune_fx.cli import main

try:
    from .test_cli_trust import error_lines, good_dir, models, run_cli  # noqa: F401 (fixtures)
except ImportError:  # tests/ on sys.path
    from test_cli_trust import error_lines, good_dir, models, run_cli  # noqa: F401 (fixtures)


# ------------------------------------------------------------------ logs, training options, resume
def test_data_run_logs_every_epoch_without_a_terminal(models, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        proc = run_cli("prune", "trustmodels.py:build", "--data", "trustmodels.py:loaders", "--epochs", "2",
                       "--finetune-epochs", "1", "--ratio", "0.3", "--out", str(tmp_path / "o"), cwd=models, stderr=f)
    text = log.read_text()
    assert proc.returncode == 0, text
    for epoch in ("scp epoch 1/2:", "scp epoch 2/2:", "finetune epoch 1/1:"):
        line = next(l for l in text.splitlines() if epoch in l)
        assert "loss" in line and "val accuracy" in line
    assert "hard FLOPs ratio" in next(l for l in text.splitlines() if "scp epoch 2/2" in l)
    assert "lambda" in text and "analysing channel dependencies" in text and "\x1b[" not in text
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["metric"]["name"] == "accuracy" and report["metric"]["before"] is not None
    assert report["traced"]["forward_reads_self_training"] is False


def test_quiet_prints_no_progress(models, tmp_path):
    proc = run_cli("prune", "trustmodels.py:build", "--ratio", "0.3", "--out", str(tmp_path / "o"), "--quiet",
                   cwd=models)
    assert proc.returncode == 0 and proc.stderr == "" and "verified" in proc.stdout


def test_loss_and_metric_on_a_dict_output_regression(models, tmp_path):
    out = tmp_path / "o"
    code = main(["prune", f"{models}/trustmodels.py:dict_model", "--ratio", "0.3", "--out", str(out), "-q",
                 "--data", f"{models}/trustmodels.py:regression_loaders", "--epochs", "1", "--lr", "0.05",
                 "--batch-size", "4", "--loss", f"{models}/trustmodels.py:dict_loss",
                 "--metric", f"{models}/trustmodels.py:neg_mse"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"]["name"].endswith("neg_mse") and report["metric"]["after"] < 0
    assert report["options"]["lr"] == 0.05 and report["options"]["batch_size"] == 4


def test_self_training_forward_trains_the_train_graph(models, tmp_path):
    out = tmp_path / "o"
    code = main(["prune", f"{models}/trustmodels.py:train_branch", "--ratio", "0.3", "--out", str(out), "-q",
                 "--data", f"{models}/trustmodels.py:loaders", "--epochs", "1",
                 "--loss", f"{models}/trustmodels.py:maps_loss",
                 "--metric", f"{models}/trustmodels.py:maps_loss"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["traced"] == {"masked_model": "train", "pruned_model": "eval", "forward_reads_self_training": True}
    from softprune_fx.spec import import_file

    import_file(str(models / "trustmodels.py"))
    pruned = torch.load(out / "pruned.pt", weights_only=False).eval()
    y = pruned(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 4) and torch.allclose(y.sum(1), torch.ones(2))  # the eval branch: softmax


def _final_state(out: Path) -> dict:
    return torch.load(out / "state_dict.pt", weights_only=True)


def test_interrupt_then_resume_equals_uninterrupted(models, tmp_path):
    args = ["prune", "trustmodels.py:build", "--data", "trustmodels.py:loaders", "--epochs", "3", "--ratio", "0.3"]
    ref = run_cli(*args, "--out", str(tmp_path / "ref"), "-q", cwd=models)
    assert ref.returncode == 0, ref.stderr
    out = str(tmp_path / "o")
    # 32 samples an epoch, one val pass reads nothing from Interrupting: read 40 is in epoch 2
    proc = run_cli(*args, "--out", out, cwd=models, env={"INTERRUPT_AT_READ": "40"})
    assert proc.returncode == 130, proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("softprune-fx: interrupted:")]
    assert f"{out}.checkpoints/checkpoint.pt" in line and f"--out {out} --resume" in line
    assert not Path(out).exists()
    command = line.split("continue with: ", 1)[1].split()
    assert command[0] == "softprune-fx"
    proc = run_cli(*command[1:], cwd=models)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "continuing at scp epoch 2" in proc.stderr
    ref_state, got = _final_state(tmp_path / "ref"), _final_state(Path(out))
    assert ref_state.keys() == got.keys() and all(torch.equal(ref_state[k], got[k]) for k in got)
    assert json.loads((Path(out) / "report.json").read_text())["resumed_from"] == "scp epoch 1"


# ------------------------------------------------------------------ early errors
@pytest.fixture
def weights(models, tmp_path):
    from softprune_fx.spec import build_model

    sd = build_model(f"{models}/trustmodels.py:build")[0].state_dict()
    layouts = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
               "model_state_dict": {"model_state_dict": sd, "optimizer": {}},
               "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}}}
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    return tmp_path, list(layouts)


def test_weights_layouts_are_unwrapped(models, weights, capsys):
    folder, names = weights
    for name in names:
        out = folder / f"out-{name}"
        assert main(["prune", f"{models}/trustmodels.py:build", "--ratio", "0.3", "--out", str(out), "-q",
                     "--weights", str(folder / f"{name}.pt")]) == 0, name


def test_pruned_weights_get_the_apply_plan_hint(models, good_dir, tmp_path, capsys):
    assert main(["prune", f"{models}/trustmodels.py:build", "--ratio", "0.3", "--out", str(tmp_path / "o"),
                 "-q", "--weights", str(good_dir / "state_dict.pt")]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "shapes differ" in line and "apply_plan" in line


BAD = [  # (argv after the spec, exit code, fragment of the one error line)
    (["--ratio", "0.3", "--out", "."], 2, "is the current directory"),
    (["--ratio", "0.3", "--out", ".."], 2, "a parent of the current directory"),
    (["--ratio", "0.3", "--out", "afile.txt"], 2, "exists and is not a directory"),
    (["--ratio", "0.3", "--input-shape", "1x3x8x8"], 2, "expected comma-separated positive sizes"),
    (["--ratio", "0.3", "--data", "trustmodels.py:loaders", "--epochs", "1", "--resume"], 2, "no checkpoint"),
    (["--ratio", "0.3", "--weights", "wrong.pt"], 1, "2 unexpected keys"),
]


@pytest.mark.parametrize("argv, code, fragment", BAD, ids=[b[2][:28] for b in BAD])
def test_bad_input_one_line_before_any_work(models, argv, code, fragment, tmp_path):
    (models / "afile.txt").write_text("x")
    torch.save({"x.weight": torch.zeros(1), "y.bias": torch.zeros(1)}, models / "wrong.pt")
    proc = run_cli("prune", "trustmodels.py:build", *argv, "-q", cwd=models)
    assert proc.returncode == code
    (line,) = error_lines(proc.stderr)
    assert fragment in line and "Traceback" not in proc.stderr
    if code == 2:
        assert proc.stdout == ""  # refused before any work


def test_did_you_mean_and_force_listing(models, tmp_path, capsys):
    assert main(["prune", f"{models}/trustmodels.py:biuld", "--ratio", "0.3", "-q"]) == 2
    assert "did you mean 'build'?" in capsys.readouterr().err
    out = tmp_path / "o"
    out.mkdir()
    for name in ("notes.txt", "old.bin"):
        (out / name).write_text("x")
    assert main(["prune", f"{models}/trustmodels.py:build", "--ratio", "0.3", "--out", str(out), "--force",
                 "-q"]) == 0
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "--force" in l]
    assert "2 entries: notes.txt, old.bin" in line and not (out / "notes.txt").exists()


def test_help_shows_defaults():
    from softprune_fx.cli_args import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "(default: 0.1)" in text and "(default: softprune-out)" in text and "--leaf-modules" in text


