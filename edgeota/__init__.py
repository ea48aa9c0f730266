"""edgeota: edge model packaging and over-the-air updates. See README.md."""

from edgeota_contract.version import __version__

__all__ = ["__version__"]
