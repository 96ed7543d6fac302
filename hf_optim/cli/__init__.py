"""The ``hf-optim`` command line."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """``text`` with every non-printable character (terminal escape sequences, other control characters) shown
    as a Python escape: strings read from a checkpoint reach the terminal inert. Newlines and tabs are kept."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
