"""User-facing errors.

Every problem caused by the user's input (a bad file, an unknown pass, calibration data
that does not fit the model) is raised as a `QCompilerError` whose message is one
sentence naming the problem. The CLI prints it and exits with status 2; anything else
that escapes is a bug in qcompiler and is reported as such.
"""


class QCompilerError(Exception):
    """A problem with the user's input, explained in one sentence."""


class PipelineError(QCompilerError):
    """A pipeline string or pass option that cannot be parsed or resolved."""


class CalibrationError(QCompilerError):
    """Calibration data that is missing, malformed, or does not match the model."""


class VerificationError(QCompilerError):
    """A function-preserving pass changed the model's outputs beyond tolerance."""
