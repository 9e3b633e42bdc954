"""The one exception type the CLI turns into a single line and exit code 1."""

from __future__ import annotations


class MoedgeError(Exception):
    """A user-facing error: says what is wrong and what to do about it."""
