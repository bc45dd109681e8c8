"""The one exception type for user mistakes.

The command line prints a ``DanaError`` as a single line and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DanaError(ValueError):
    """A user-facing error: bad configuration, missing data, unwritable output."""
