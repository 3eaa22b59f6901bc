"""matplotlib for the lab's reports, off-screen; the `lab` extra installs it, the serving image does not."""

from __future__ import annotations

from types import ModuleType

from lmsan_serve.errors import LmsanError

MISSING = "the reports' plots need matplotlib: pip install 'lmsan-serve[lab]'"


def require_plotting() -> None:
    """Fail before hours of work, not at the plot that ends them."""
    pyplot()


def pyplot() -> ModuleType:
    try:
        import matplotlib
    except ImportError as exc:
        raise LmsanError(MISSING) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
