"""The one exception type for user errors.

Everything a user can get wrong (a bad setting, a missing file, an offline hub id) raises
``DiffutronError``: a ``ValueError`` whose message is one line naming the problem and the fix.
The CLI prints that line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class DiffutronError(ValueError):
    """A user error: one line that names the problem and how to fix it."""
