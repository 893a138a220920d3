"""The one exception family for user errors.

Anything raised as a :class:`PrtoolError` is the user's to fix (bad input, a missing optional
dependency, a failed validation): the CLI prints it on one line and exits non-zero. Every other
exception is a bug in prtool and keeps its traceback.
"""

from __future__ import annotations


class PrtoolError(Exception):
    """A user error: the message names the problem and the fix."""

    exit_code = 1


class MissingDependencyError(PrtoolError):
    """An optional dependency (tensorrt, onnxruntime-gpu, ...) is not installed."""


class ValidationError(PrtoolError):
    """An exported artifact disagrees with PyTorch beyond the stated tolerances.

    Raised by ``prtool.export.validate.ValidationReport.raise_if_failed`` with the ``report`` and the
    ``result`` the command would have printed (its ``--json`` document); the CLI shows either, then
    the one-line message.
    """

    exit_code = 2

    def __init__(self, message: str, report=None, result: dict | None = None):
        super().__init__(message)
        self.report = report
        self.result = result


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency lazily, or raise an error that names the fix."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        hint = f"pip install 'prtool[{extra}]'" if extra else f"pip install {module}"
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(f"{module} is not installed{what}: {hint}") from exc
