"""Errors shared by every layer: a user mistake is a UsageError, printed as one line by common.cli."""


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong shape); shown as one line, exit code 2."""
