"""The ``softprune-fx`` command line: ``deps``, ``prune``, ``verify``.

Exit codes (also in the README): 0 success; 1 failure (the model, weights, ratio or a
check failed); 2 usage (bad arguments, spec, input shape, DIR in the way); 3 pruned and
written, but ONNX export failed with both exporters. Errors are one line on stderr; add
``--debug`` for the traceback.

    softprune-fx deps examples/digits.py:build
    softprune-fx prune examples/digits.py:build --ratio 0.4 --out out
    softprune-fx verify out
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from softprune_fx.passes.errors import SoftpruneError

from .cli_errors import EXIT_FAILURE, EXIT_OK, EXIT_ONNX_EXPORT, EXIT_USAGE, ModelError, UsageError, one_line
from .spec import absolute_spec, build_model, example_inputs_for, load_data, load_weights

PROG = "softprune-fx"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (one line, exit 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _stderr(kind: str, text: str) -> None:
    print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


def _step_factory(console: Console):
    """``step(text)``: a spinner on a terminal, nothing otherwise."""
    def step(text: str):
        return console.status(text + " ...") if console.is_terminal else contextlib.nullcontext()
    return step


# ------------------------------------------------------------------ shared model set-up
def prepare(args) -> tuple[nn.Module, tuple]:
    """Build the spec's model (seeded), load weights, eval mode, example inputs, one test forward."""
    torch.manual_seed(getattr(args, "seed", 0))
    model, module = build_model(args.spec)
    inputs = example_inputs_for(module, args.input_shape)
    if getattr(args, "weights", None):
        load_weights(model, args.weights)
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - show torch's own message
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise ModelError(f"the model does not run on inputs of shape {shapes}: "
                         f"{type(exc).__name__}: {one_line(exc, 300)}") from exc
    return model, inputs


def bn_looks_untrained(model: nn.Module) -> bool:
    """True when every BatchNorm has gamma 1, beta 0, running mean 0 and running var 1."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    defaults = (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
    return bool(bns) and all(getattr(m, name) is None or bool(torch.all(getattr(m, name) == value))
                             for m in bns for name, value in defaults)


def _frozen(args) -> list[str]:
    return [f for item in (args.frozen or []) for f in item.split(",") if f]


# ------------------------------------------------------------------ deps
def dependency_totals(model: nn.Module, inputs: tuple, cg) -> dict:
    """Group and channel counts, and the share of FLOPs in layers a prunable group touches."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    root = type(model).__name__
    per_module = {k[len(root) + 1:]: sum(v.values()) for k, v in counter.get_flop_counts().items()
                  if k.startswith(root + ".")}
    total = int(counter.get_total_flops())
    prunable = [g for g in cg.groups if g.prunable]
    touched = {name for g in prunable for name in (*g.producers, *g.sites)}
    channel_groups = [g for g in cg.groups if not g.is_site_group]
    return {
        "groups": len(cg.groups), "prunable_groups": len(prunable),
        "site_groups": sum(g.is_site_group for g in cg.groups),
        "channels": sum(g.width for g in channel_groups),
        "prunable_channels": sum(g.width - len(g.frozen_channels) for g in channel_groups if g.prunable),
        "flops": total, "prunable_flops_share": (sum(per_module.get(n, 0) for n in touched) / total
                                                 if total else 0.0),
        "untraced": cg.untraced, "inexact": list(cg.flow.inexact),
    }


def cmd_deps(args, out: Console, err: Console) -> int:
    """Print the channel dependency report; optionally write it as JSON and DOT."""
    from . import analyze

    model, inputs = prepare(args)
    with _step_factory(err)("analysing channel dependencies"):
        cg = analyze(model, inputs, frozen=_frozen(args), allow_inexact=args.allow_inexact)
        totals = dependency_totals(model, inputs, cg)
    out.print(cg.summary())
    out.print(f"[bold]{totals['groups']}[/] groups ({totals['prunable_groups']} prunable, "
              f"{totals['site_groups']} site groups); {totals['prunable_channels']} of "
              f"{totals['channels']} channels prunable; {totals['prunable_flops_share']:.1%} of "
              f"{_flops(totals['flops'])} in layers whose input or output channels can be pruned")
    for name in totals["untraced"]:
        out.print(f"untraced submodule (channels frozen): {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(cg.to_dict() | {"totals": totals}, indent=1) + "\n")
    if args.dot:
        import networkx as nx
        graph = cg.to_networkx()
        graph = nx.relabel_nodes(graph, {n: json.dumps(n) for n in graph})  # ':' is a DOT port
        nx.drawing.nx_pydot.write_dot(graph, args.dot)
    return EXIT_OK


# ------------------------------------------------------------------ prune
def _parse_round_to(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--round-to must be auto, none or a positive integer, not {text!r}")


def _check_prune_args(args) -> Any:
    """Usage checks that need no model; returns the parsed --round-to."""
    from .artifacts import check_out_dir

    if not 0.0 < args.ratio < 1.0:
        raise UsageError(f"--ratio must be between 0 and 1 (exclusive), not {args.ratio:g}")
    if args.min_width < 1:
        raise UsageError(f"--min-width must be at least 1, not {args.min_width}")
    if not args.data and (args.epochs or args.finetune_epochs or args.resume):
        raise UsageError("--epochs, --finetune-epochs and --resume need --data")
    if args.data and not args.epochs:
        raise UsageError("--data needs --epochs N (N >= 1)")
    round_to = _parse_round_to(args.round_to)
    check_out_dir(args.out, args.force)
    return round_to


def _run_pruning(args, model, inputs, round_to, step, ckpt: Path) -> tuple[Any, Any, dict]:
    """One-shot or SCP training: ``(pruned, result, info)``."""
    options = dict(strict=args.strict, frozen=_frozen(args), min_width=args.min_width, round_to=round_to,
                   allow_inexact=args.allow_inexact)
    if not args.data:
        from . import prune_one_shot

        with step(f"one-shot pruning to a {args.ratio:.0%} FLOPs cut"):
            pruned, result = prune_one_shot(model, inputs, args.ratio, **options)
        return pruned, result, {"mode": "one-shot (BN statistics)"}
    from .train import train_scp

    train_loader, val_loader = load_data(args.data)
    pruned, result, info = train_scp(
        model, inputs, train_loader, val_loader, ratio=args.ratio, epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, out_dir=str(ckpt), resume=args.resume, seed=args.seed,
        progress=sys.stderr.isatty(), **options)
    return pruned, result, {"mode": "SCP training", **dict(info or {})}


def cmd_prune(args, out: Console, err: Console) -> int:
    """The whole pipeline: build, prune, write DIR atomically, verify, summarise."""
    from . import analyze
    from .artifacts import write_artifacts
    from .plan_io import make_plan

    round_to = _check_prune_args(args)
    step = _step_factory(err)
    model, inputs = prepare(args)
    warnings = []
    if not args.data and bn_looks_untrained(model):
        warnings.append("every BatchNorm has gamma 1, beta 0 and running stats 0/1: the weights look "
                        "untrained, so the one-shot ranking is meaningless (pass --weights or --data)")
        _stderr("warning", warnings[-1])
    with step("analysing channel dependencies"):
        cg = analyze(model, inputs, frozen=_frozen(args), allow_inexact=args.allow_inexact)
    if not any(g.prunable for g in cg.groups):
        reasons = sorted({g.frozen_reason for g in cg.groups if g.frozen_reason})[:3]
        raise SoftpruneError(f"no prunable channel group ({'; '.join(reasons)}); run "
                             f"`{PROG} deps {args.spec}` to see why")
    ckpt = Path(f"{args.out}.checkpoints")
    pruned, result, info = _run_pruning(args, model, inputs, round_to, step, ckpt)
    model.eval()  # training may leave it in train mode; the plan is made in eval mode
    plan = make_plan(model, inputs, result.drop, result, frozen=_frozen(args), allow_inexact=args.allow_inexact)
    meta = _report_meta(args, plan, info, warnings)
    report = write_artifacts(args.out, original=model, pruned=pruned, inputs=inputs, result=result,
                             plan=plan, meta=meta, force=args.force, step=step)
    if ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    out.print(cg.summary(short=True))
    out.print(summary_table(report))
    return _prune_verdict(report, args.out, out)


def _report_meta(args, plan: dict, info: dict, warnings: list[str]) -> dict:
    """What report.json records about the run besides the pruning figures."""
    from . import __version__

    info = dict(info)
    meta = {"spec": absolute_spec(args.spec), "spec_given": args.spec, "input_shape": args.input_shape,
            "inputs": plan["inputs"], "softprune_version": __version__, "torch_version": torch.__version__,
            "mode": info.pop("mode"), "warnings": warnings,
            "options": {k: getattr(args, k) for k in ("ratio", "strict", "allow_inexact", "round_to", "min_width",
                                                      "seed", "weights", "data", "epochs", "finetune_epochs")}}
    meta["options"]["frozen"] = _frozen(args)
    for key in ("accuracy_masked", "accuracy_pruned"):
        if key in info:
            meta[key] = info.pop(key)
    if info:
        meta["training"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, list))}
    return meta


def _flops(n: float) -> str:
    for unit, size in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} FLOPs"


def _change(before, after) -> str:
    return f"{(after - before) / before:+.1%}" if before and after is not None else "-"


def summary_table(report: dict) -> Table:
    """Before/after: FLOPs, params, ORT latency, accuracy when trained."""
    table = Table(title=f"pruned {report['spec_given']} (target {report['target_ratio']:.0%} FLOPs cut)")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right" if col else "left")
    fb, fa, pb, pa = (report[k] for k in ("flops_before", "flops_after", "params_before", "params_after"))
    table.add_row("FLOPs", _flops(fb), _flops(fa), _change(fb, fa))
    table.add_row("params", f"{pb:,}", f"{pa:,}", _change(pb, pa))
    lb, la = report.get("latency_ms_before"), report.get("latency_ms_after")
    if la is not None:
        table.add_row("ORT latency (median)", f"{lb:.3f} ms" if lb is not None else "-", f"{la:.3f} ms",
                      _change(lb, la))
    if "accuracy_pruned" in report:
        table.add_row("val accuracy (masked -> pruned)", f"{report.get('accuracy_masked', float('nan')):.2%}",
                      f"{report['accuracy_pruned']:.2%}", "")
    return table


def _prune_verdict(report: dict, out_dir: str, out: Console) -> int:
    """Print the verification line and map the report's status to an exit code."""
    from .artifacts import checked_batches

    for c in (report.get("onnx_check") or {}).get("per_batch", {}).values():
        if "skipped" in c:
            _stderr("note", c["skipped"])
    masked = f"pruned == hard-masked in torch (max|diff| {report['max_abs_diff_masked']:.2g})"
    if report["status"] == "onnx_export_failed":
        out.print(f"{masked}; wrote {out_dir}")
        _stderr("error", f"pruned and written to {out_dir}, but ONNX export failed with both exporters, "
                         f"so the ONNX Runtime check could not run: {report['onnx_error']}")
        return EXIT_ONNX_EXPORT
    if report["status"] != "ok":
        _stderr("error", f"{'; '.join(report['failed'])}; {out_dir} was written for inspection "
                         "(see report.json)")
        return EXIT_FAILURE
    batches = ", ".join(checked_batches(report["onnx_check"]["per_batch"]))
    out.print(f"[green]verified[/]: {masked}; ONNX Runtime ({report['onnx_exporter']} export) == torch at "
              f"batch {batches} (max|diff| {report['max_abs_diff_onnx']:.2g}); wrote {out_dir}")
    return EXIT_OK


# ------------------------------------------------------------------ verify
def cmd_verify(args, out: Console, err: Console) -> int:
    """Re-check a DIR from the safe path (builder + plan.json + weights) against pruned.onnx."""
    from .verify_api import verify_artifacts

    result = verify_artifacts(args.dir, spec=args.spec, input_shape=args.input_shape,
                              step=_step_factory(err))
    for note in result.notes:
        _stderr("note", note)
    if not result.ok:
        _stderr("error", result.summary())
        return EXIT_FAILURE
    out.print(result.summary())
    return EXIT_OK


# ------------------------------------------------------------------ parser and main
def _min_width(text: str):
    """``--min-width``: an int (channels) or a float in (0, 1) (a fraction of the width)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is neither a channel count >= 1 nor a fraction in (0, 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Operation-aware soft channel pruning (SCP) as a torch.fx pass.",
                     epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 pruned but ONNX export failed")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model = _Parser(add_help=False)
    model.add_argument("spec", metavar="SPEC", help="path/to/file.py:function or package.module:function")
    model.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (';' between inputs); "
                       "default: the file's example_inputs()")
    model.add_argument("--allow-inexact", action="store_true", help="prune through ops that mix channels")
    model.add_argument("--frozen", action="append", metavar="NAMES",
                       help="module prefixes or group ids to leave alone (repeat or comma-separate)")

    deps = sub.add_parser("deps", parents=[model, common], help="print the channel dependency report")
    deps.add_argument("--json", metavar="FILE", help="write the report as JSON")
    deps.add_argument("--dot", metavar="FILE", help="write the coupling graph as Graphviz DOT")
    deps.set_defaults(func=cmd_deps)

    prune = sub.add_parser("prune", parents=[model, common], help="prune and write DIR")
    prune.add_argument("--ratio", type=float, required=True, help="target FLOPs cut, in (0, 1)")
    prune.add_argument("--data", metavar="SPEC", help="function returning (train_loader, val_loader)")
    prune.add_argument("--epochs", type=int, default=0, help="SCP training epochs (with --data)")
    prune.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after pruning")
    prune.add_argument("--resume", action="store_true", help="resume SCP training from DIR.checkpoints")
    prune.add_argument("--weights", metavar="FILE", help="a state dict to load first")
    prune.add_argument("--strict", action="store_true", help="only prune channels with BN statistics")
    prune.add_argument("--round-to", default="auto", help="channel rounding: auto, none or N")
    prune.add_argument("--min-width", type=_min_width, default=1,
                       help="keep at least N channels per group, or a fraction F in (0, 1) of its width")
    prune.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's; 1 is safest on a busy machine)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", default="softprune-out", metavar="DIR", help="output directory")
    prune.add_argument("--force", action="store_true", help="replace an existing non-empty DIR")
    prune.set_defaults(func=cmd_prune)

    verify = sub.add_parser("verify", parents=[common], help="re-check a DIR written by prune")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("--spec", help="model spec (default: the one in DIR/report.json)")
    verify.add_argument("--input-shape", help="input shape (default: the one in DIR/plan.json)")
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors: one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    out = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.func(args, out, err)
    except UsageError as exc:
        error, code, text = exc, EXIT_USAGE, one_line(exc)
    except SoftpruneError as exc:
        error, code, text = exc, EXIT_FAILURE, one_line(exc)
    except KeyboardInterrupt as exc:
        error, code, text = exc, 130, "interrupted"
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        error, code, text = exc, EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}" + (
            "" if debug else " (rerun with --debug for the traceback)")
    if debug:
        traceback.print_exception(error)
    _stderr("error", text)
    return code


if __name__ == "__main__":
    sys.exit(main())
