"""edgeota: edge model packaging and over-the-air updates. See README.md."""

__version__ = "0.1.0"
