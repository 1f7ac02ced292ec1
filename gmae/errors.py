"""The one exception type for mistakes a user can make (bad file, bad setting).

The CLI prints a `GMAEError` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class GMAEError(ValueError):
    """A user-caused error: the message names the file or value and what to do."""
