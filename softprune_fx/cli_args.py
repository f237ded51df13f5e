"""The ``softprune-fx`` argument parser and its argument types.

Defaults are shown in ``--help`` (ArgumentDefaultsHelpFormatter). Other options that
belong to one feature (latency targets, ORT threads) are added here with small edits.
"""
from __future__ import annotations

import argparse

from .cli_errors import UsageError

PROG = "softprune-fx"
EPILOG = ("exit codes: 0 ok, 1 failure, 2 usage, 3 pruned but the ONNX file could not be verified "
          "(export failed, or it holds one branch of a data-dependent leaf), 130 interrupted")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (one line, exit 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not "(default: None)" / "(default: False)" noise."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def min_width(text: str):
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def parse_round_to(text: str):
    """``auto`` / ``none`` / a positive int."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--round-to must be auto, none or a positive integer, not {text!r}")


def split_names(items) -> list[str]:
    """Repeatable, comma-separated NAMES options as one flat list."""
    return [f.strip() for item in (items or []) for f in item.split(",") if f.strip()]


def _sub(sub, name: str, parents, help: str) -> Parser:
    return sub.add_parser(name, parents=parents, help=help, description=help, formatter_class=_Help)


def _model_options() -> Parser:
    model = Parser(add_help=False)
    model.add_argument("spec", metavar="SPEC", help="path/to/file.py:function or package.module:function")
    model.add_argument("--input-shape", metavar="SHAPE",
                       help="example input shape as comma-separated sizes, e.g. 1,3,224,224 (';' between "
                            "several inputs); default: the file's example_inputs()")
    model.add_argument("--allow-inexact", action="store_true", help="prune through ops that mix channels")
    model.add_argument("--frozen", action="append", metavar="NAMES",
                       help="module prefixes or group ids to leave alone (repeat or comma-separate)")
    model.add_argument("--leaf-modules", action="append", metavar="NAMES",
                       help="module names or class names not to trace into (their channels are frozen; "
                            "repeat or comma-separate), e.g. head.detect,MyAttention")
    return model


def _prune_options(prune: Parser) -> None:
    prune.add_argument("--ratio", type=float, required=True, help="target cut, in (0, 1): of FLOPs, or of ORT latency with --target latency")
    prune.add_argument("--weights", metavar="FILE", help="weights to load first: a state dict or a checkpoint "
                       "dict holding one under model / state_dict / model_state_dict (DDP 'module.' ok)")
    prune.add_argument("--strict", action="store_true", help="only prune channels with BN statistics")
    prune.add_argument("--round-to", default="auto", help="channel rounding: auto, none or N")
    prune.add_argument("--target", choices=["flops", "latency"], default="flops",
                       help="what --ratio cuts: FLOPs, or the ONNX Runtime latency (one-shot only)")
    prune.add_argument("--ort-threads", type=positive_int, default=None,
                       help="ORT intra-op threads the latency is measured and predicted for (default: ORT's own)")
    prune.add_argument("--latency-cache", metavar="DIR", default=None,
                       help="latency tables (default: $SOFTPRUNE_LATENCY_CACHE or ~/.cache/softprune-fx/latency)")
    prune.add_argument("--min-width", type=min_width, default=1,
                       help="keep at least N channels per group, or a fraction F in (0, 1) of its width")
    prune.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads (default: torch's; 1 is safest on a busy machine)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the model build, data order and masks")
    prune.add_argument("--out", default="softprune-out", metavar="DIR", help="output directory")
    prune.add_argument("--force", action="store_true", help="replace an existing non-empty DIR (the files it "
                       "replaces are listed first)")
    train = prune.add_argument_group("training (with --data; see the README's loader contract)")
    train.add_argument("--data", metavar="SPEC", help="function returning (train_loader, val_loader)")
    train.add_argument("--epochs", type=int, default=0, help="SCP training epochs (with --data)")
    train.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after pruning")
    train.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate of the SCP epochs "
                       "(fine-tuning uses a tenth)")
    train.add_argument("--batch-size", type=positive_int, default=None,
                       help="rebatch the loaders (map-style datasets only; default: the loaders' own)")
    train.add_argument("--loss", metavar="FILE.py:FUNCTION", default=None,
                       help="loss(output, target) -> scalar tensor, for any output structure "
                            "(default: cross-entropy)")
    train.add_argument("--metric", metavar="FILE.py:FUNCTION", default=None,
                       help="metric(output, target) -> float, higher is better, averaged over the "
                            "validation batches (default: top-1 accuracy)")
    train.add_argument("--resume", action="store_true", help="resume SCP training from DIR.checkpoints")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``deps``, ``prune``, ``verify``."""
    parser = Parser(prog=PROG, description="Operation-aware soft channel pruning (SCP) as a torch.fx pass.",
                    epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress output (errors, warnings and "
                        "the result still print)")
    model = _model_options()

    deps = _sub(sub, "deps", [model, common], "print the channel dependency report")
    deps.add_argument("--json", metavar="FILE", help="write the report as JSON")
    deps.add_argument("--dot", metavar="FILE", help="write the coupling graph as Graphviz DOT")

    prune = _sub(sub, "prune", [model, common], "prune and write DIR")
    _prune_options(prune)

    verify = _sub(sub, "verify", [common], "re-check a DIR written by prune")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("--ort-threads", type=positive_int, default=None,
                        help="ORT intra-op threads to re-measure the latency with (default: ORT's own)")
    verify.add_argument("--spec", help="model spec (default: the one in DIR/report.json)")
    verify.add_argument("--input-shape", help="input shape (default: the one in DIR/plan.json)")
    return parser
