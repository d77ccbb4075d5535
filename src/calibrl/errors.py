"""`UsageError`: a mistake in the user's input, reported by the CLI as one line without a traceback."""


class UsageError(Exception):
    """A mistake in the user's input (config, arguments, paths, data): one line, exit status 2."""
