"""The one exception type the prep raises for problems a user can fix."""


class PrepError(Exception):
    """Bad input or state; the CLI prints the message on one line and exits non-zero."""
