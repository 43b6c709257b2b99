"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the input, what is wrong and the flag or file to change."""

    exit_code = 2
