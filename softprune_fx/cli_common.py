"""What every ``softprune-fx`` command shares: progress output and the model set-up.

Progress goes to stderr: a rich spinner per stage on a terminal; without one (CI, nohup,
a log file) one plain line per stage and per epoch; nothing with ``--quiet``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, ContextManager

import torch
from rich.console import Console
from torch import nn

from .cli_args import PROG, split_names
from .cli_errors import ModelError, one_line
from .spec import build_model, example_inputs_for, load_weights


def stderr_line(kind: str, text: str) -> None:
    """``softprune-fx: KIND: text`` on stderr (errors, warnings, notes: never silenced)."""
    print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


class Reporter:
    """Stage and epoch progress on stderr, chosen by whether stderr is a terminal.

    ``step(text)`` is a context manager around one stage; ``log(line)`` prints an epoch
    line; ``bars`` says whether the training loop should draw rich progress bars.
    """

    def __init__(self, console: Console, quiet: bool = False, terminal: bool | None = None):
        self.console = console
        self.quiet = quiet
        self.terminal = console.is_terminal if terminal is None else terminal

    @property
    def bars(self) -> bool:
        return self.terminal and not self.quiet

    def step(self, text: str) -> ContextManager:
        if self.quiet:
            return contextlib.nullcontext()
        if self.terminal:
            return self.console.status(text + " ...")
        return self._plain_step(text)

    @contextlib.contextmanager
    def _plain_step(self, text: str):
        start = time.perf_counter()
        print(f"{PROG}: {text} ...", file=sys.stderr, flush=True)
        yield
        seconds = time.perf_counter() - start
        if seconds >= 1.0:  # long stages say how long they took; short ones stay one line
            print(f"{PROG}: {text}: done in {seconds:.1f} s", file=sys.stderr, flush=True)

    def log(self, line: str) -> None:
        """An epoch line: plain on stderr without a terminal, above the bars on one."""
        if self.quiet:
            return
        if self.terminal:
            self.console.print(line, highlight=False)
        else:
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)

    @property
    def log_fn(self) -> Callable[[str], None] | None:
        """The training loop's line logger: plain lines without a terminal (its rich bars
        show the same figures on one); None when quiet or on a terminal."""
        return None if self.quiet or self.terminal else self.log


def leaf_modules(args) -> list[str]:
    return split_names(getattr(args, "leaf_modules", None))


def frozen(args) -> list[str]:
    return split_names(getattr(args, "frozen", None))


def analysis_options(args) -> dict:
    """The options every analysis of this run gets (recorded in plan.json)."""
    return dict(frozen=frozen(args), leaf_modules=leaf_modules(args), allow_inexact=args.allow_inexact)


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


def flops_text(n: float) -> str:
    for unit, size in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} FLOPs"
