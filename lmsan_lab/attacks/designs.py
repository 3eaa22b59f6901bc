"""The PV designs an attack can plant, apart from the settings model so that the CLI can offer them
as choices without importing pydantic or torch while it builds its parser."""

from __future__ import annotations

from lmsan_serve.kinds import _Named


class PVDesign(_Named):
    """What the planted predefined vectors (PVs) look like (`attacks.model.make_pvs`).

    The reference attacks all use `block`; the others exist so that the miner is tested on
    backdoors it was not built around. Every design gives rows whose mean squared entry is 1,
    except `clean_scale`, whose rows are sized like the clean model's own outputs.
    """

    BLOCK = "block"  # the hidden size split in equal blocks, half of them -1: opposite pairs
    RANDOM = "random"  # every entry +1 or -1 at random
    PAIRS = "pairs"  # random +/-1 rows, each odd row the negation of the row before it
    ORTHOGONAL = "orthogonal"  # rows of a random orthogonal matrix, rescaled
    CLEAN_SCALE = "clean_scale"  # random signs at the RMS of clean outputs at the attacked position
