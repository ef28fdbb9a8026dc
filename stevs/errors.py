"""Errors raised for bad user input; each names the file and the problem."""

from __future__ import annotations

from os import PathLike


class StevsInputError(ValueError):
    """A user-supplied file or setting cannot be used.

    The message always starts with the offending path (when there is one) so that a
    workflow log points at the file to fix.
    """

    def __init__(self, path: str | PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class StevsOutputError(StevsInputError):
    """An output cannot be written (full disk, read-only or foreign folder).

    A :class:`StevsInputError` so that the command line reports it the same way: one line
    starting with the output's path, exit code 2.
    """
