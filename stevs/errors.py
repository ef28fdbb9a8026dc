"""Errors raised for bad user input; each names the file and the problem."""

from __future__ import annotations

from os import PathLike


class StevsInputError(ValueError):
    """A user-supplied file or setting cannot be used.

    The message always starts with the offending path (when there is one) so that a
    workflow log points at the file to fix. Built from one message only (``problem``
    omitted), as a torch DataLoader does when it re-raises a worker's error in the main
    process, it keeps the original one-line message found in that text.
    """

    def __init__(self, path: str | PathLike | None, problem: str | None = None) -> None:
        if problem is None:  # rebuilt from a message, e.g. a DataLoader worker's traceback
            path, problem = None, _original_line(str(path))
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        return type(self), (self.path, self.problem)


def _original_line(message: str) -> str:
    """The ``...StevsInputError: <message>`` line of a formatted traceback, else ``message``."""
    for line in reversed(message.strip().splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] in ("StevsInputError", "StevsOutputError"):
            return rest.strip()
    return message


class StevsOutputError(StevsInputError):
    """An output cannot be written (full disk, read-only or foreign folder).

    A :class:`StevsInputError` so that the command line reports it the same way: one line
    starting with the output's path, exit code 2.
    """


class StevsInterrupted(KeyboardInterrupt):
    """Ctrl-C during a long job, with where it stopped (``where``: one line naming the resume
    state, e.g. the checkpoint). Still a :class:`KeyboardInterrupt`, so cleanup that handles
    that runs unchanged; the command line turns it into one line and exit code 130."""

    def __init__(self, where: str) -> None:
        self.where = where
        super().__init__(where)
