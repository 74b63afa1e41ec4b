"""Numeric helpers shared by the drivers that scale raw values to engineering units."""

from __future__ import annotations


def tidy(x: float) -> float:
    """Drop binary noise from scaling (2301 * 0.1 is 230.10000000000002): 12 significant digits."""
    return float(f"{x:.12g}")
