"""User-facing errors, and qcompiler's own faults.

Every problem caused by the user's input (a bad file, an unknown pass, calibration data
that does not fit the model) is raised as a `QCompilerError` whose message is one
sentence naming the problem. The CLI prints it and exits with status 2; anything else
that escapes is a bug in qcompiler and is reported as such (exit status 1), `QCompilerBug`
when qcompiler caught its own fault (an artifact that fails validation).
"""


import contextlib
from typing import Iterator


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-sentence errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class QCompilerError(Exception):
    """A problem with the user's input, explained in one sentence."""


class PipelineError(QCompilerError):
    """A pipeline string or pass option that cannot be parsed or resolved."""


class CalibrationError(QCompilerError):
    """Calibration data that is missing, malformed, or does not match the model."""


class VerificationError(QCompilerError):
    """A function-preserving pass changed the model's outputs beyond tolerance."""


class QCompilerBug(Exception):
    """qcompiler's own fault, caught before it reached the user's disk (never the input's fault)."""


@contextlib.contextmanager
def blame_qcompiler(stage: str) -> Iterator[None]:
    """Within the block, a `QCompilerError` is qcompiler's fault: the model being run is qcompiler's own output.

    onnxruntime refusing a model reads as bad input where the user gave the model, and as
    a qcompiler bug where a pass or a lowering wrote it (``stage``: "in pass 'rotate'").
    """
    try:
        yield
    except QCompilerError as exc:
        raise QCompilerBug(f"qcompiler produced an invalid model {stage} ({exc}); nothing was written; please "
                           "report it with the --debug traceback") from exc
