"""Template-owned runtime. Do not edit: `cruft update` replaces this folder.

Owners write handlers in ``handlers.py`` against the names exported here.
"""

from .errors import ConfigError, DeadLetter, RetryLater
from .router import Context, Router

__all__ = ["ConfigError", "Context", "DeadLetter", "RetryLater", "Router"]
