"""lmsan-serve: guard prompt-tuned language models against task-agnostic backdoors.

Method: LMSanitator (Wei, Meng et al., NDSS 2024, arXiv 2308.13904).
"""

__version__ = "0.1.0"

from .backbone import Backbone, load_backbone  # noqa: E402
from .errors import LmsanError  # noqa: E402

__all__ = ["Backbone", "LmsanError", "load_backbone", "__version__"]
