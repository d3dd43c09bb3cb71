"""The two error families.

``OptimizeError`` and its subclasses are a user's mistake or an environment that cannot do
what was asked: the CLI prints their one-line message and exits non-zero, without a stack
trace. Anything else is a bug and keeps its traceback.
"""


class OptimizeError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""

    exit_code = 2


class CheckpointError(OptimizeError):
    """The checkpoint cannot be read, is unsafe to read, or does not fit the architecture."""


class InputSpecError(OptimizeError):
    """Input names, shapes or dtypes are missing, malformed or inconsistent with the model."""


class CalibrationError(OptimizeError):
    """Calibration or evaluation data cannot be read or does not match the model's inputs."""


class ExportError(OptimizeError):
    """The model cannot be exported to ONNX (unsupported operator, dynamic control flow)."""


class ParityError(ExportError):
    """A converted model's outputs differ from the stage before beyond the tolerance."""


class TargetUnavailable(OptimizeError):
    """The target needs hardware or packages this machine does not have."""


class BuildError(OptimizeError):
    """A target's engine could not be built for the stated reason."""


class BundleError(OptimizeError):
    """A bundle folder is missing, incomplete or would overwrite something that is not a bundle."""


class PruneError(OptimizeError):
    """The model cannot be pruned as asked (a layer torch-pruning cannot follow, a bad option)."""
