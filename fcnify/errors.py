"""The one exception family of fcnify.

Core modules raise these; only ``fcnify.cli`` turns them into a red line on stderr and an exit code.
Every error carries a ``hint``: what the user can do about it.
"""

from __future__ import annotations

__all__ = [
    "ConversionError", "EngineError", "ExportError", "FcnifyError", "InputError", "InternalError",
    "MissingDependencyError", "ModelLoadError", "NotEquivalentError", "OutputError", "UnsafeModelError", "describe",
    "first_line"
]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters (library errors can
    run to pages; a user error is one line)."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def describe(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: first line`` of an exception, for messages that wrap a library's error."""
    line = first_line(exc, limit)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


class FcnifyError(Exception):
    """Base class for every error fcnify reports to a user.

    Args:
        message: What went wrong, in one line.
        hint: How to fix it, in one line (optional).
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(FcnifyError):
    """Bad user input: a missing file, an unreadable image, a wrong option value."""

    exit_code = 1


class ModelLoadError(FcnifyError):
    """A model spec that cannot be resolved or loaded."""

    exit_code = 1


class UnsafeModelError(ModelLoadError):
    """A model file whose loading would run code from the file, and the user did not trust it."""

    exit_code = 1


class OutputError(FcnifyError):
    """An output path that exists (without --force) or cannot be written."""

    exit_code = 1


class MissingDependencyError(FcnifyError):
    """An optional package a feature needs is not installed (the hint names the ``pip install``)."""

    exit_code = 1


class EngineError(FcnifyError):
    """The distributed engine failed as a whole (Ray could not start or join, or its job failed)."""

    exit_code = 1


class InternalError(FcnifyError):
    """Something fcnify did not expect went wrong inside fcnify or a library it calls (a bug to report)."""

    exit_code = 70  # EX_SOFTWARE (sysexits.h)


class NotEquivalentError(FcnifyError):
    """The converted network does not compute the same function as the original within tolerance."""

    exit_code = 3


class ConversionError(FcnifyError):
    """A model (or one node of it) that cannot be rewritten into a correct fully-convolutional network."""

    exit_code = 4


class ExportError(FcnifyError):
    """A converted network that cannot be exported (an op ONNX cannot express, a missing exporter)."""

    exit_code = 4
