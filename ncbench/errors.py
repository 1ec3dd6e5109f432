"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class UserError(ValueError):
    """Bad input from the user: a flag, a file or a plugin. The message names it and what was expected."""
