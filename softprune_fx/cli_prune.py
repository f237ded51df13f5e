"""``softprune-fx prune``: build, prune (one-shot or SCP training), write DIR, verify, summarise."""
from __future__ import annotations

import os
import shlex
import shutil
import warnings as warnings_module
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from softprune_fx.passes.errors import SoftpruneError

from .cli_args import PROG, parse_round_to
from .cli_common import Reporter, analysis_options, flops_text, frozen, prepare, stderr_line
from .cli_errors import EXIT_FAILURE, EXIT_OK, EXIT_ONNX_EXPORT, Interrupted, UsageError, one_line
from .spec import absolute_spec, load_data

PACKAGE_DIR = str(Path(__file__).resolve().parent)  # our own warnings (training shortfalls) only


def bn_looks_untrained(model: nn.Module) -> bool:
    """True when every BatchNorm has gamma 1, beta 0, running mean 0 and running var 1."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    defaults = (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
    return bool(bns) and all(getattr(m, name) is None or bool(torch.all(getattr(m, name) == value))
                             for m in bns for name, value in defaults)


def set_ort_threads(threads) -> None:
    """``--ort-threads``: the report's ORT timings use that many intra-op threads."""
    if threads:
        os.environ["SOFTPRUNE_FX_ORT_THREADS"] = str(int(threads))


def check_prune_args(args) -> Any:
    """Usage checks that need no model; returns the parsed --round-to."""
    from .artifacts import check_out_dir

    if not 0.0 < args.ratio < 1.0:
        raise UsageError(f"--ratio must be between 0 and 1 (exclusive), not {args.ratio:g}")
    if args.min_width < 1:
        raise UsageError(f"--min-width must be at least 1, not {args.min_width}")
    if not args.data and (args.epochs or args.finetune_epochs or args.resume or args.loss or args.metric
                          or args.batch_size):
        raise UsageError("--epochs, --finetune-epochs, --resume, --loss, --metric and --batch-size need --data")
    if args.data and not args.epochs:
        raise UsageError("--data needs --epochs N (N >= 1)")
    if args.target == "latency" and args.data:
        raise UsageError("--target latency is one-shot only (no --data) for now")
    set_ort_threads(args.ort_threads)
    if args.resume:
        from .train import CHECKPOINT

        path = Path(f"{args.out}.checkpoints") / CHECKPOINT
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint at {path} (it is written after each epoch of a run "
                             f"with the same --out and removed when the run completes)")
    round_to = parse_round_to(args.round_to)
    check_out_dir(args.out, args.force, announce=True)
    return round_to


def resume_command(args) -> str:
    """The exact command that continues this run from its checkpoint."""
    argv = list(getattr(args, "argv", None) or [])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join([PROG, *argv])


def _objective(args):
    from .spec import load_builder
    from .train_support import Objective

    loss = load_builder(args.loss) if args.loss else None
    metric = load_builder(args.metric) if args.metric else None
    return Objective.make(loss, metric, loss_name=args.loss, metric_name=args.metric)


def _resume_note(line: str) -> None:
    """With --quiet, the loop's lines are dropped except the one saying where it resumes."""
    if line.startswith("resuming"):
        stderr_line("note", line)


def _train(args, model, inputs, options, rep: Reporter, ckpt: Path, cg):
    """SCP training from --data; Ctrl-C becomes Interrupted with the --resume command."""
    from .train import CHECKPOINT, train_scp
    from .train_support import rebatch

    train_loader, val_loader = load_data(args.data)
    try:
        train_loader, val_loader = rebatch(train_loader, args.batch_size), rebatch(val_loader, args.batch_size)
    except SoftpruneError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return train_scp(model, inputs, train_loader, val_loader, ratio=args.ratio, epochs=args.epochs,
                         finetune_epochs=args.finetune_epochs, out_dir=str(ckpt), resume=args.resume,
                         seed=args.seed, progress=rep.bars, log=rep.log_fn or _resume_note, lr=args.lr,
                         objective=_objective(args), analysis=cg, **options)
    except KeyboardInterrupt:
        if not (ckpt / CHECKPOINT).is_file():
            raise Interrupted("Ctrl-C before the first epoch ended: no checkpoint, nothing to resume") from None
        raise Interrupted(f"Ctrl-C; checkpoint {ckpt / CHECKPOINT} holds the last finished epoch; "
                          f"continue with: {resume_command(args)}") from None


def run_pruning(args, model, inputs, round_to, rep: Reporter, ckpt: Path, cg) -> tuple[Any, Any, dict]:
    """One-shot or SCP training on the analysis ``cg``: ``(pruned, result, info)``."""
    options = dict(strict=args.strict, min_width=args.min_width, round_to=round_to, **analysis_options(args))
    if not args.data:
        from . import prune_one_shot

        what = "ORT latency (latency tables, measured)" if args.target == "latency" else "FLOPs"
        with rep.step(f"one-shot pruning to a {args.ratio:.0%} {what} cut"):
            pruned, result = prune_one_shot(model, inputs, args.ratio, analysis=cg, target=args.target,
                                            ort_threads=args.ort_threads, latency_cache=args.latency_cache,
                                            **options)
        return pruned, result, {"mode": "one-shot (BN statistics)"}
    pruned, result, info = _train(args, model, inputs, options, rep, ckpt, cg)
    return pruned, result, {"mode": "SCP training", **dict(info or {})}


def graph_leaves(cg, leaf_options=()) -> dict[str, str]:
    """``{module name: why it is a leaf}`` for the untraced submodules of an analysis and
    those the user asked for (``--leaf-modules``: names or class names), as called in its graph."""
    why = dict(cg.gm.meta.get("untraced_why", {}) or {})
    leaves = {name: str(why.get(name) or "untraceable") for name in cg.untraced}
    wanted = set(leaf_options)
    for node in cg.gm.graph.nodes:
        if node.op == "call_module" and node.target not in leaves:
            cls = type(cg.gm.get_submodule(node.target)).__name__
            if node.target in wanted or cls in wanted:
                leaves[node.target] = f"--leaf-modules {node.target if node.target in wanted else cls}"
    return leaves


def cmd_prune(args, out: Console, rep: Reporter) -> int:
    """The whole pipeline: build, prune, write DIR atomically, verify, summarise."""
    from . import analyze
    from .artifacts import write_artifacts
    from .plan_io import make_plan

    round_to = check_prune_args(args)
    with rep.step("building the model"):
        model, inputs = prepare(args)
    warnings = []
    if not args.data and bn_looks_untrained(model):
        warnings.append("every BatchNorm has gamma 1, beta 0 and running stats 0/1: the weights look "
                        "untrained, so the one-shot ranking is meaningless (pass --weights or --data)")
        stderr_line("warning", warnings[-1])
    with rep.step("analysing channel dependencies"):
        cg = analyze(model, inputs, **analysis_options(args))
        cg.check_capture(model)  # every artifact derives from the captured graph
    if not any(g.prunable for g in cg.groups):
        reasons = sorted({g.frozen_reason for g in cg.groups if g.frozen_reason})[:3]
        raise SoftpruneError(f"no prunable channel group ({'; '.join(reasons)}); run "
                             f"`{PROG} deps {args.spec}` to see why")
    ckpt = Path(f"{args.out}.checkpoints")
    with warnings_module.catch_warnings(record=True) as caught:  # one line each, and into the report
        warnings_module.simplefilter("always", UserWarning)
        pruned, result, info = run_pruning(args, model, inputs, round_to, rep, ckpt, cg)
    for w in caught:
        if issubclass(w.category, UserWarning) and w.filename.startswith(PACKAGE_DIR):
            warnings.append(one_line(str(w.message)))
            stderr_line("warning", warnings[-1])
    model.eval()  # training may leave it in train mode; the plan is made in eval mode
    plan = make_plan(model, inputs, result.drop, result, **analysis_options(args))  # on result.analysis
    meta = report_meta(args, plan, info, warnings)
    leaves = graph_leaves(getattr(result, "analysis", None) or cg, analysis_options(args)["leaf_modules"])
    report = write_artifacts(args.out, original=model, pruned=pruned, inputs=inputs, result=result,
                             plan=plan, meta=meta, force=args.force, step=rep.step, leaves=leaves)
    if ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    out.print(cg.summary(short=True))
    out.print(summary_table(report))
    return prune_verdict(report, args.out, out)


def report_meta(args, plan: dict, info: dict, warnings: list[str]) -> dict:
    """What report.json records about the run besides the pruning figures."""
    from . import __version__

    info = dict(info)
    meta = {"spec": absolute_spec(args.spec), "spec_given": args.spec, "input_shape": args.input_shape,
            "inputs": plan["inputs"], "softprune_version": __version__, "torch_version": torch.__version__,
            "mode": info.pop("mode"), "warnings": warnings,
            "options": {k: getattr(args, k) for k in ("ratio", "strict", "allow_inexact", "round_to", "min_width",
                                                      "seed", "weights", "data", "epochs", "finetune_epochs",
                                                      "lr", "batch_size", "loss", "metric")}}
    meta["options"]["frozen"] = frozen(args)
    meta["options"]["leaf_modules"] = analysis_options(args)["leaf_modules"]
    for key in ("accuracy_masked", "accuracy_pruned", "traced", "resumed_from"):
        if key in info:
            meta[key] = info.pop(key)
    if "metric" in info:
        meta["metric"] = {"name": info.pop("metric"), "higher_is_better": True,
                          "before": info.pop("metric_before"), "after": info.pop("metric_pruned"),
                          "masked_before_finalize": info.pop("metric_masked")}
    if info:
        meta["training"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, list))}
    return meta


def _change(before, after) -> str:
    return f"{(after - before) / before:+.1%}" if before and after is not None else "-"


def summary_table(report: dict) -> Table:
    """Before/after: FLOPs, params, ORT latency (and its prediction with --target latency),
    accuracy when trained."""
    what = "latency" if report.get("target") == "latency" else "FLOPs"  # target_ratio's unit
    table = Table(title=f"pruned {report['spec_given']} (target {report['target_ratio']:.0%} {what} cut)")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right" if col else "left")
    fb, fa, pb, pa = (report[k] for k in ("flops_before", "flops_after", "params_before", "params_after"))
    table.add_row("FLOPs", flops_text(fb), flops_text(fa), _change(fb, fa))
    table.add_row("params", f"{pb:,}", f"{pa:,}", _change(pb, pa))
    lb, la = report.get("latency_ms_before"), report.get("latency_ms_after")
    if la is not None:
        table.add_row("ORT latency (median)", f"{lb:.3f} ms" if lb is not None else "-", f"{la:.3f} ms",
                      _change(lb, la))
    pb_ms, pa_ms = report.get("ort_pred_ms_before"), report.get("ort_pred_ms_after")
    if pa_ms is not None:  # --target latency: the latency model's prediction beside the measurement
        n = report.get("ort_threads")
        table.add_row(f"ORT latency predicted ({n or 'default'} thread{'' if n == 1 else 's'})",
                      f"{pb_ms:.3f} ms", f"{pa_ms:.3f} ms", _change(pb_ms, pa_ms))
    metric = report.get("metric")
    if metric:
        fmt = (lambda v: "-" if v is None else f"{v:.2%}") if metric["name"] == "accuracy" else (
            lambda v: "-" if v is None else f"{v:.4g}")
        before, after = metric["before"], metric["after"]
        diff = "" if before is None or after is None else (
            f"{(after - before) * 100:+.2f} pts" if metric["name"] == "accuracy" else f"{after - before:+.4g}")
        table.add_row(f"val {metric['name']} (model given -> pruned)", fmt(before), fmt(after), diff)
        table.add_row("  masked model, before finalize", "", fmt(metric["masked_before_finalize"]), "")
    return table


def kinds_text(kinds: list[str]) -> str:
    """``random inputs at batch 1, 3, normal x5, constant +5, constant -5, example``."""
    batches = [k for k in kinds if k.isdigit()]
    rest = [k for k in kinds if not k.isdigit()]
    head = f"random inputs at batch {', '.join(batches)}" if batches else ""
    return ", ".join([p for p in (head, *rest) if p])


def prune_verdict(report: dict, out_dir: str, out: Console) -> int:
    """Print the verification line and map the report's status to an exit code."""
    from .artifacts import checked_batches

    for c in (report.get("onnx_check") or {}).get("per_batch", {}).values():
        if "skipped" in c:
            stderr_line("note", c["skipped"])
    masked = f"pruned == hard-masked in torch (max|diff| {report['max_abs_diff_masked']:.2g})"
    if report["status"] == "onnx_export_failed":
        out.print(f"{masked}; wrote {out_dir}")
        stderr_line("error", f"pruned and written to {out_dir}, but ONNX export failed with both exporters, "
                             f"so the ONNX Runtime check could not run: {report['onnx_error']}")
        return EXIT_ONNX_EXPORT
    if report["status"] == "onnx_one_branch":
        out.print(f"{masked}; wrote {out_dir}")
        stderr_line("error", f"pruned and written to {out_dir}, but NOT verified: "
                             f"{report['onnx_one_branch']['message']}")
        return EXIT_ONNX_EXPORT
    if report["status"] != "ok":
        stderr_line("error", f"{'; '.join(report['failed'])}; {out_dir} was written for inspection "
                             "(see report.json)")
        return EXIT_FAILURE
    out.print(f"[green]verified[/]: {masked}; ONNX Runtime ({report['onnx_exporter']} export) == torch on "
              f"{kinds_text(checked_batches(report['onnx_check']['per_batch']))} "
              f"(max|diff| {report['max_abs_diff_onnx']:.2g}); wrote {out_dir}", highlight=False)
    return EXIT_OK
