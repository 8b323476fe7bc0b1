"""The error vocabulary at the program's boundary.

`UserError` is anything an operator can fix (bad config, unreadable certificate, port in use): the CLI
prints its message as one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """An operator-fixable problem, reported as one line naming what is wrong."""
