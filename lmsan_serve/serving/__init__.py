"""The guarded endpoint: Ray Serve app (`app.py`) over a plain-Python service (`service.py`).

`app` imports Ray Serve; import it only where serving happens.
"""

from .config import Limits, Reloadable, ServeConfig, TaskConfig, parse_config
from .service import CallResult, ClassifyCall, GuardService

__all__ = ["CallResult", "ClassifyCall", "GuardService", "Limits", "Reloadable", "ServeConfig", "TaskConfig",
           "parse_config"]
