"""PV mining: fuzz training of soft triggers, filters, calibration, signature file with a verdict."""

from .config import MiningConfig
from .job import MiningResult, calibrate, mine, stale_checkpoint
from .model import Candidate, fuzz_round, prepare

__all__ = ["Candidate", "MiningConfig", "MiningResult", "calibrate", "fuzz_round", "mine", "prepare",
           "stale_checkpoint"]
