"""Synthetic slices of the bbox-LDM tests: the image side and elliptic lung masks (imported by name, beside
this folder's conftest)."""

import numpy as np

S = 32  # image side of the synthetic slices


def lung_masks(n: int, size: int = S) -> np.ndarray:
    """Two elliptic lungs per slice, their size varying a little from slice to slice."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        ry, rx = size * (0.30 + 0.02 * (i % 3)), size * 0.16
        for cx in (size * 0.3, size * 0.7):
            out[i] |= ((yy - size / 2) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out
