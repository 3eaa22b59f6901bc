"""Settings of `lmsan demo` that its command line needs, apart from the demo's heavy imports."""

from __future__ import annotations

from lmsan_serve.kinds import _Named

# The demo's search stops after this many rounds in a row without a new PV, fewer than `lmsan
# mine`'s default to keep the demo short: a PV that a quarter of the rounds reach is still missed
# with probability 0.1 (MiningConfig.miss_probability); the demo reports how mining ended.
DEMO_PATIENCE = 8
MAX_SEARCH_ROUNDS = 60  # a bound on the demo's search should the stopping rule not end it first


class GuardWith(_Named):
    """Which signature set the demo's endpoint guards with."""

    MINED = "mined"  # what mining found: what a defender has
    PLANTED = "planted"  # the attack's own PVs: the answer key, served only as a comparison
