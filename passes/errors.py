"""Error types shared by the passes and the public API.

Every error a user can cause derives from ``SoftpruneError`` and carries a one-line
message that says what is wrong and what to do.
"""


class SoftpruneError(Exception):
    """Base class of every softprune-fx error."""


class CaptureError(SoftpruneError):
    """The model could not be traced or run on its example inputs."""


class IllegalDropError(SoftpruneError):
    """A ``drop`` mapping names a frozen channel, an unknown group, or would empty a tensor."""


class SurgeryError(SoftpruneError):
    """The pruned graph does not have the planned layout (a bug: please report it)."""


class BudgetError(SoftpruneError):
    """No legal keep set reaches the requested FLOPs cut."""


class OnnxExportError(SoftpruneError):
    """Both ONNX exporters failed."""
