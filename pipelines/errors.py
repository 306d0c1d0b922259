"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits with 2."""


class UserError(Exception):
    """Bad input the user can fix: a config key, a data row, a missing model. The message names the culprit."""
