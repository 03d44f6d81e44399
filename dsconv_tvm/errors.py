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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (``signum``) arrived: the CLI ends the verb with exit 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: the signal that interrupted this process, once one did (set by the CLI's handler)
PENDING_SIGNAL: list[int] = []


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived, even if TVM swallowed the exception the
    handler raised (an interrupt inside a Python callback of a TVM pass becomes a plain error that
    a fallback may catch).  Called before an output is committed, so nothing is written after an
    interrupt."""
    if PENDING_SIGNAL:
        raise Interrupted(PENDING_SIGNAL[0])


#: non-empty while signals must not raise (inside C++ code that calls back into Python on its own
#: threads, where an exception ends in std::terminate): the handler only records the signal
DEFER_INTERRUPTS: list[bool] = []
