"""Error kinds and exit codes of the ``softprune-fx`` command line.

=====  =========================================================================
code   meaning
=====  =========================================================================
0      success
1      failure: the model, its weights, the ratio or a check failed (one line says why)
2      usage: bad arguments, spec, input shape, or an output DIR that is in the way
3      pruned and written, but pruned.onnx is not verified: both exporters failed, or
       it holds one branch of a data-dependent leaf (the report names the leaf)
130    interrupted (Ctrl-C); the message gives the checkpoint and the --resume command
=====  =========================================================================
"""
from __future__ import annotations

import re

from softprune_fx.passes.errors import SoftpruneError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_ONNX_EXPORT = 3
EXIT_INTERRUPTED = 130


class UsageError(SoftpruneError):
    """The command line or a spec is wrong: exit code 2, nothing was run or written."""


class Interrupted(SoftpruneError):
    """Ctrl-C during a run: exit code 130; the message says how to resume."""


class ModelError(SoftpruneError):
    """The user's builder, data function, weights or model failed: exit code 1."""


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception (or text) as one line without ANSI codes, at most ``limit`` chars.

    Example:
        >>> one_line(ValueError("bad\\n  thing"))
        'bad thing'
    """
    text = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
