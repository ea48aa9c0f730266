"""Import a heavy module on first attribute access.

numpy costs ~15 MB of RSS; an agent that has no model yet never needs it. Modules write::

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = lazy_module("numpy")

and use ``np`` as usual; the first ``np.<name>`` imports numpy, after which the proxy's own
``__dict__`` holds numpy's namespace, so later lookups cost what a module attribute costs.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lazy_lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        # Only called for names not yet in __dict__, i.e. until the first load.
        with self._lazy_lock:
            module = importlib.import_module(self.__name__)
            self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first use."""
    return _LazyModule(name)
