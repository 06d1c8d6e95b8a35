"""Whether this machine can run the CuPy kernels, and why not."""

from __future__ import annotations


def unavailable() -> str | None:
    """``None`` with a usable CUDA device, else the reason (printed with every skipped test)."""
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error}); install normkit-cupy to run the GPU tests"
    try:
        if cupy.is_available():
            return None
    except Exception as error:  # a driver that cannot even be asked
        return f"no CUDA device: cupy.is_available() raised {type(error).__name__}: {error}"
    return f"no CUDA device: cupy.is_available() is False (CuPy {cupy.__version__}); the GPU tests need one"
