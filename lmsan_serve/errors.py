"""One exception type for every problem a user can fix: the CLI prints it as one line and exits 2,
the HTTP API returns it as a 4xx reason."""


class LmsanError(Exception):
    """A user-facing error: bad input, a missing or mismatched file, an unsupported setting."""


def first_problem(exc, prefix: tuple[str, ...] = (), default: str = "") -> str:
    """`where: what` of a pydantic ValidationError's first error, on one line (its own text spans
    several): where a user looks, in the terms the file or flag uses."""
    err = exc.errors()[0]
    where = ".".join([*prefix, *(str(x) for x in err["loc"])]) or default
    return f"{where + ': ' if where else ''}{err['msg']}"


def settings(model_cls, what: str, **values):
    """Build a pydantic settings model; a bad value becomes a one-line LmsanError naming the field."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise LmsanError(f"invalid {what} settings: {first_problem(exc)}") from exc
