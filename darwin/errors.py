"""User errors: the command line prints them as one line, with no traceback."""


class DarwinError(Exception):
    """Bad input from the user (a path, a file, a genome, a config): the message names the problem."""
