"""User-facing errors. Each carries the one line the CLI prints; the CLI maps them to exit codes."""
from __future__ import annotations


class DfkdError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the one line shown."""

    exit_code = 2


class UsageError(DfkdError):
    """Bad arguments or options."""


class RecipeError(DfkdError):
    """The recipe file is missing, unreadable or violates the schema."""


class TeacherError(DfkdError):
    """The teacher file cannot be loaded, understood or trusted."""


class ConversionError(TeacherError):
    """The teacher was loaded but the converted torch model disagrees with the original."""


class DataError(DfkdError):
    """An evaluation data set cannot be read."""


class ExportError(DfkdError):
    """The student could not be exported, or the export disagrees with the student."""


class TrainingError(DfkdError):
    """Training diverged (NaN/Inf) or otherwise cannot continue."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an underlying library's message, for the one line a user sees."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
