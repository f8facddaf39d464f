"""The one error type the CLI turns into exit code 2 and a one-line message."""


class HarnessError(Exception):
    """A problem with the user's input (argument, config, data file, results folder).

    The message names the offending file or argument and what is wrong with it, on one line.
    """
