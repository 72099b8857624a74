"""The one exception type for user mistakes.

Every check of user input (a path, a config field, a tensor in a checkpoint, a CLI value) raises
:class:`MobiLlamaError` with a one-line message naming the file, key or value at fault. The CLI turns it
into ``error: <message>`` and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MobiLlamaError(ValueError):
    """A user-facing error: bad input, not a bug. The message is shown as is."""
