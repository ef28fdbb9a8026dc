"""Ranges of numeric command-line options: one mechanism for every ``stevs`` subcommand.

Each numeric option takes one of these as its argparse ``type=``: a :class:`Number` that
parses the text, refuses NaN and infinity, checks the range and raises
``argparse.ArgumentTypeError`` naming the range; argparse then prints one line naming the
option (``stevs train: error: argument --lr: must be > 0, got nan``) and exits with 2,
before any work starts. :func:`show_ranges` appends each option's range to its help.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """An argparse ``type=``: a whole or real number within ``lo``..``hi``.

    ``lo_open`` / ``hi_open`` exclude the bound itself; ``None`` leaves that side open.
    """

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return "int" if self.integer else "float"

    @property
    def range(self) -> str:
        """The range in words, e.g. ``a whole number >= 1``, ``> 0``, ``from 0 to 1``."""
        kind = "a whole number " if self.integer else ""
        if self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            return f"{kind}from {self.lo:g} to {self.hi:g}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return (kind + " and ".join(parts) or kind + "finite").strip()

    def __call__(self, text: str) -> int | float:
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.range}, got {text!r}") from None
        if not (math.isfinite(value) and self.contains(value)):
            raise argparse.ArgumentTypeError(f"must be {self.range}, got {text}")
        return value

    def contains(self, value: float) -> bool:
        """Whether ``value`` is within the range."""
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def outside(self) -> list[str]:
        """Texts this type refuses: NaN, infinity, just beyond each bound, a fraction for
        whole numbers (the test of every option's range uses them)."""
        texts = ["nan", "inf", "-inf"]
        if self.lo is not None:
            texts.append(f"{self.lo:g}" if self.lo_open else f"{self.lo - 1:g}")
        if self.hi is not None:
            texts.append(f"{self.hi:g}" if self.hi_open else f"{self.hi + 1:g}")
        if self.integer:
            texts.append(f"{(self.lo or 0) + 1.5:g}")
        return texts


def positive_int() -> Number:
    """A whole number >= 1."""
    return Number(True, 1)


def non_negative_int() -> Number:
    """A whole number >= 0."""
    return Number(True, 0)


def positive_float() -> Number:
    """A finite number > 0."""
    return Number(False, 0, lo_open=True)


def non_negative_float() -> Number:
    """A finite number >= 0."""
    return Number(False, 0)


def in_range(lo: float, hi: float, *, integer: bool = False) -> Number:
    """A finite number (or whole number) within ``lo``..``hi``, both included."""
    return Number(integer, lo, hi)


def int_at_least(lo: int) -> Number:
    """A whole number >= ``lo``."""
    return Number(True, lo)


def show_ranges(parser: argparse.ArgumentParser) -> None:
    """Append each numeric option's range to its help text, e.g. ``(> 0)``."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        if isinstance(action.type, Number):
            action.help = f"{action.help or ''} [{action.type.range}]".strip()


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of ``parser`` that take a number (typed ``int``/``float`` or a range)."""
    return [
        a
        for a in parser._actions  # noqa: SLF001
        if a.type in (int, float) or isinstance(a.type, Number)
    ]
