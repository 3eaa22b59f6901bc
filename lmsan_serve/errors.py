"""One exception type for every problem a user can fix: the CLI prints it as one line and exits 2,
the HTTP API returns it as a 4xx reason."""


class LmsanError(Exception):
    """A user-facing error: bad input, a missing or mismatched file, an unsupported setting."""
