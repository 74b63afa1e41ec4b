"""gatewayd: an edge gateway daemon that loses no reading."""

__version__ = "0.1.0"
