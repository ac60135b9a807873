"""Error messages of bounded length: one line, whatever the input.

A config can hold anything (a 10 MB value, 300k unknown keys); an error about it must still be
one readable line. A bad value is shown by :func:`shown` (its ``repr``, cut after
:data:`MAX_SHOWN` characters), a list of bad keys by :func:`listed` (the first
:data:`MAX_LISTED` and a count), and :func:`cap_message` cuts whatever a section builds itself.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["MAX_LISTED", "MAX_MESSAGE", "MAX_SHOWN", "cap_message", "listed", "shown"]

MAX_SHOWN = 200
"""Characters of a bad value's ``repr`` an error shows before it gives only the length of the rest."""

MAX_LISTED = 10
"""Unknown keys an error names before it gives only their count."""

MAX_MESSAGE = 2000
"""Characters of one error line; :func:`cap_message` cuts the middle of a longer one."""


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut after :data:`MAX_SHOWN` characters (a 10 MB value
    gives a short line saying how much was left out)."""
    text = repr(value)
    if len(text) <= MAX_SHOWN:
        return text
    return f"{text[:MAX_SHOWN]}... ({len(text) - MAX_SHOWN} more characters)"


def listed(items: Sequence[Any]) -> str:
    """The first :data:`MAX_LISTED` items as a list, then how many more there are."""
    head = "[" + ", ".join(shown(x) for x in items[:MAX_LISTED]) + "]"
    return head if len(items) <= MAX_LISTED else f"{head} and {len(items) - MAX_LISTED} more"


def cap_message(text: str) -> str:
    """``text`` as one line of about :data:`MAX_MESSAGE` characters at most: line breaks become
    spaces, and a longer text keeps its start (what is wrong) and its end (what is allowed), with
    the count of what was left out between them."""
    text = " ".join(text.splitlines())
    if len(text) <= MAX_MESSAGE:
        return text
    head, tail = MAX_MESSAGE * 3 // 4, MAX_MESSAGE // 4
    return f"{text[:head]} ... ({len(text) - head - tail} characters left out) ... {text[-tail:]}"
