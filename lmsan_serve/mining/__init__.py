"""PV mining: fuzz training of soft triggers, filters, calibration, signature file with a verdict."""

from .checkpoint import stale_checkpoint, stale_checkpoints
from .config import MiningConfig
from .job import RECOVERED, MiningResult, calibrate, mine, recovered
from .model import Candidate, fuzz_round, prepare

__all__ = ["RECOVERED", "Candidate", "MiningConfig", "MiningResult", "calibrate", "fuzz_round", "mine", "prepare",
           "recovered", "stale_checkpoint", "stale_checkpoints"]
