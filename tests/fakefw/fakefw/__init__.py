"""A stand-in "framework" for the registry tests: an array type that is not a NumPy array.

Importing this module is what a user importing torch or tensorflow would do; normkit must
load the ``fakefw`` backend only after that.
"""

from __future__ import annotations

import numpy as np

__version__ = "1.0"


class Array:
    """A minimal array: wraps a NumPy array; slicing returns another ``Array``."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.asarray(data)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __getitem__(self, index: object) -> Array:
        return Array(self.data[index])

    def __repr__(self) -> str:
        return f"fakefw.Array({self.data!r})"
