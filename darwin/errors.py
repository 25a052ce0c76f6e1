"""User errors: the command line prints them as one line, with no traceback."""


class DarwinError(Exception):
    """Bad input from the user (a path, a file, a genome, a config): the message names the problem.

    Retrying does not help such an error, so tasks do not retry it; a subclass that a rerun resumes (an interrupted
    upload) says so with `retryable = True`."""

    retryable = False
