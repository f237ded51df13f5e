"""The ``softprune-fx`` command line: ``deps``, ``prune``, ``verify``.

Exit codes (also in the README): 0 success; 1 failure (the model, weights, ratio or a
check failed); 2 usage (bad arguments, spec, input shape, DIR in the way); 3 pruned and
written, but pruned.onnx could not be verified (both exporters failed, or it holds one
branch of a data-dependent leaf); 130 interrupted. Errors are one line on stderr; add
``--debug`` for the traceback. The parser is in cli_args.py, ``prune`` in cli_prune.py.

    softprune-fx deps examples/digits.py:build
    softprune-fx prune examples/digits.py:build --ratio 0.4 --out out
    softprune-fx verify out
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from softprune_fx.passes.errors import SoftpruneError

from .cli_args import build_parser
from .cli_common import Reporter, analysis_options, flops_text, prepare, stderr_line
from .cli_errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Interrupted, UsageError, one_line
from .cli_prune import bn_looks_untrained, cmd_prune, summary_table  # noqa: F401 - re-exported

__all__ = ["main", "build_parser", "cmd_deps", "cmd_prune", "cmd_verify", "dependency_totals"]


# ------------------------------------------------------------------ deps
def dependency_totals(model: nn.Module, inputs: tuple, cg) -> dict:
    """Group and channel counts, and the share of FLOPs in layers a prunable group touches."""
    from .passes.flops import MORE_FORMULAS
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=MORE_FORMULAS) as counter:
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
        "untraced_why": {name: str(why) for name, why in (cg.gm.meta.get("untraced_why") or {}).items()},
    }


def print_specialisations(specs: list[dict], out: Console, limit: int = 8) -> None:
    """One line per Python decision the trace answered from the example (the first ``limit``)."""
    for s in specs[:limit]:
        batch = "; reads the batch size: the pruned model is for this batch only" if s.get("batch") else ""
        out.print(f"specialised at {s.get('where')}: {s.get('code') or s.get('expr')} "
                  f"({s.get('expr')} -> {s.get('value')!r}{batch})", highlight=False, soft_wrap=True)
    if len(specs) > limit:
        out.print(f"... and {len(specs) - limit} more specialisations (deps --json lists them all)", highlight=False)


def cmd_deps(args, out: Console, rep: Reporter) -> int:
    """Print the channel dependency report; optionally write it as JSON and DOT."""
    from . import analyze

    with rep.step("building the model"):
        model, inputs = prepare(args)
    with rep.step("analysing channel dependencies"):
        cg = analyze(model, inputs, **analysis_options(args))
        cg.check_capture(model)
        totals = dependency_totals(model, inputs, cg)
    out.print(cg.summary())
    out.print(f"[bold]{totals['groups']}[/] groups ({totals['prunable_groups']} prunable, "
              f"{totals['site_groups']} site groups); {totals['prunable_channels']} of "
              f"{totals['channels']} channels prunable; {totals['prunable_flops_share']:.1%} of "
              f"{flops_text(totals['flops'])} in layers whose input or output channels can be pruned")
    for leaf in totals["untraced"]:
        why = totals["untraced_why"].get(leaf)
        out.print(f"untraced submodule (channels frozen): {leaf}" + (f": {why}" if why else ""), highlight=False)
    print_specialisations(cg.specialisations, out)
    if args.json:
        Path(args.json).write_text(json.dumps(cg.to_dict() | {"totals": totals}, indent=1, default=str) + "\n")
    if args.dot:
        import networkx as nx
        graph = cg.to_networkx()
        graph = nx.relabel_nodes(graph, {n: json.dumps(n) for n in graph})  # ':' is a DOT port
        nx.drawing.nx_pydot.write_dot(graph, args.dot)
    return EXIT_OK


# ------------------------------------------------------------------ verify
def cmd_verify(args, out: Console, rep: Reporter) -> int:
    """Re-check a DIR from the safe path (builder + plan.json + weights) against pruned.onnx."""
    from .cli_prune import set_ort_threads
    from .verify_api import verify_artifacts

    set_ort_threads(args.ort_threads)  # --ort-threads: re-measure with that many ORT threads
    result = verify_artifacts(args.dir, spec=args.spec, input_shape=args.input_shape, step=rep.step)
    for note in result.notes:
        stderr_line("note", note)
    if not result.ok:
        stderr_line("error", result.summary())
        return result.exit_code
    out.print(result.summary())
    return EXIT_OK


COMMANDS = {"deps": cmd_deps, "prune": cmd_prune, "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors: one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    out = Console(width=None if sys.stdout.isatty() else 120)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # for the exact --resume command after an interrupt
        rep = Reporter(Console(stderr=True), quiet=args.quiet)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args, out, rep)
    except UsageError as exc:
        error, code, text = exc, EXIT_USAGE, one_line(exc)
    except Interrupted as exc:
        error, code, text = exc, EXIT_INTERRUPTED, one_line(exc)
    except SoftpruneError as exc:
        error, code, text = exc, EXIT_FAILURE, one_line(exc)
    except KeyboardInterrupt as exc:
        error, code, text = exc, EXIT_INTERRUPTED, "interrupted (nothing was written)"
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        error, code, text = exc, EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}" + (
            "" if debug else " (rerun with --debug for the traceback)")
    if debug:
        traceback.print_exception(error)
    stderr_line("interrupted" if code == EXIT_INTERRUPTED else "error", text)
    return code


if __name__ == "__main__":
    sys.exit(main())
