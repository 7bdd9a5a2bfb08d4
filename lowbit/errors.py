"""The one exception type for problems the user can fix (bad paths, bad recipes, bad text).

The CLI turns a LowbitError into a one-line message and exit code 2, with no traceback; anything else
is a bug in lowbit and keeps its traceback.
"""


class LowbitError(Exception):
    """A user-facing error: the message names the problem and what to do about it."""
