"""User-facing errors.

Every problem caused by the user's input (a file, a layer, an option value, a missing tool) is raised
as a :class:`DSConvError` subclass with one sentence that names the problem.  The CLI prints that
sentence and exits with a non-zero code; it never shows a traceback from inside TVM for these.
"""


class DSConvError(Exception):
    """Base class of the errors the CLI reports as one line (exit code 2)."""

    exit_code = 2


class ConfigError(DSConvError, ValueError):
    """An option value is out of range (bits, block size, mantissa bits, ...)."""


class ModelError(DSConvError):
    """The model file is not usable: not ONNX, unsupported operator, bad input shape, ..."""


class TargetError(DSConvError):
    """Unknown target name or a missing cross toolchain."""


class NumericsError(DSConvError, ValueError):
    """NaN / Inf or otherwise invalid numbers given to the quantizers."""


class OutputError(DSConvError):
    """An output path cannot be written."""


class DataError(DSConvError, ValueError):
    """User data (``--inputs``/``--labels``/``--calibration`` arrays, preprocessing options) does not
    fit the model: wrong rank, shape or dtype, NaN/Inf, a label count that differs."""
