"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input (file, option, checkpoint) that they can fix.

    The command line prints its message as one line on stderr and exits with status 2, without a
    traceback. The message says what was wrong, which file, and what to do.
    """
