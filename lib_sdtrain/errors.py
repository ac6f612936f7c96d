"""The one exception type that means "the user gave us something we cannot use".

The CLI prints a `UserError` as one line and exits non-zero; the UI shows it in the status box.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (a missing file, an unknown option, an unusable model)."""


class DiskError(UserError):
    """A write failed for a reason of the disk or folder (full, read-only, no permission); one line for the user."""
