"""Errors raised on bad user input."""

from __future__ import annotations

import os


class DataFormatError(ValueError):
    """A data file does not follow its format.

    The message names the file, the 1-based line (or record) when there is one, and the problem.

    >>> str(DataFormatError("train.txt", "label id 9 out of range [0, 5)", line=3))
    'train.txt:3: label id 9 out of range [0, 5)'
    """

    def __init__(self, path: str | os.PathLike, problem: str, *, line: int | None = None) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


class LabelOutOfRange(DataFormatError):
    """A label id past the label space a data file was read with (``bound``: that space's size)."""

    def __init__(self, path: str | os.PathLike, label: int, bound: int, *, line: int | None = None) -> None:
        super().__init__(path, f"label id {label} out of range [0, {bound})", line=line)
        self.label, self.bound = label, bound


class RunDoesNotFit(ValueError):
    """A run's memory plan does not fit this machine; the message names the part, by how much, and the setting
    to change."""


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and what to change."""


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (later lines joined with ``; ``), for the command line's error print.

    >>> one_line(ValueError("bad value\\n  in line 3"))
    'bad value; in line 3'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
