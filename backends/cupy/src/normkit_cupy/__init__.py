"""normkit's CuPy backend: batch, layer and instance norm on CuPy arrays, with two reductions and
one fused elementwise pass per call (CuPy 14 has no cuDNN bindings, so no ready batch norm).

Installing ``normkit-cupy`` is enough for ``normkit.batch_norm(cupy_array, ...)`` and normkit's
layers to accept CuPy arrays: normkit finds this backend through the ``normkit.backends`` entry
point once ``cupy`` is imported. A CUDA device is needed to run the kernels.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
