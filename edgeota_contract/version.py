"""The edgeota release version, defined once.

The one source is the ``version`` in ``pyproject.toml``, read from the installed distribution's
metadata. Every component (the ``edgeota`` CLI, the packager's manifest lineage and report) takes
it from here, so none of them imports another component just to learn it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

DISTRIBUTION = "edgeota"
UNKNOWN_VERSION = "0+unknown"
"""What a source tree that was never installed reports (a PEP 440 version that sorts below every release)."""


def edgeota_version() -> str:
    """The installed ``edgeota`` distribution's version, or :data:`UNKNOWN_VERSION` when it is not installed.

    Never raises: a missing distribution is not an error for code that only records the version.
    """
    try:
        return _distribution_version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN_VERSION


__version__ = edgeota_version()

__all__ = ["DISTRIBUTION", "UNKNOWN_VERSION", "__version__", "edgeota_version"]
