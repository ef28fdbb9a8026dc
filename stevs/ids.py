"""The slide-id rule: one pattern for sample sheets, predict sheets and the workflow.

A slide id becomes a file name (``results/slides/{slide}.h5ad``) and a Snakemake wildcard
value, so it is letters, digits, ``_``, ``-`` or ``.``, starting with a letter or digit.
"""

from __future__ import annotations

import os
import re

#: the rule as a regular expression (the workflow's wildcard constraint uses ``.pattern``)
SLIDE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: the rule in words, for error messages
SLIDE_ID_RULE = (
    "letters, digits, '_', '-' or '.', starting with a letter or digit (it becomes a file name)"
)


def is_slide_id(value: str) -> bool:
    """True when ``value`` follows the slide-id rule."""
    return SLIDE_ID_PATTERN.fullmatch(value) is not None


def check_slide_id(value: str, source: str | os.PathLike | None = None) -> str:
    """``value`` if it follows the rule, else a :class:`StevsInputError` naming ``source``."""
    from stevs.errors import StevsInputError

    if not is_slide_id(value):
        raise StevsInputError(source, f"slide id {value!r} must be {SLIDE_ID_RULE}")
    return value
