"""A third-party backend for ``fakefw`` arrays, shipped as its own distribution with an entry
point in the ``normkit.backends`` group. It delegates the numerics to normkit's NumPy backend:
the registry tests care about discovery and dispatch, not kernels.
"""

from __future__ import annotations

import fakefw
import numpy as np

import normkit
from normkit import numpy_backend

_NUMPY = numpy_backend.normkit_backend_info()


def _wrap(a):
    return None if a is None else fakefw.Array(a)


def _unwrap(a):
    return None if a is None else a.data


@normkit.hookimpl
def normkit_backend_info():
    return normkit.BackendInfo(
        name="fakefw",
        distribution="normkit-fakefw",
        array_types=("fakefw:Array",),
        dtypes=_NUMPY.dtypes,
        devices=("cpu",),
        asarray=lambda array, dtype, device: fakefw.Array(_NUMPY.asarray(array, dtype, device)),
        to_numpy=lambda a: np.array(a.data, copy=True),
        dtype_name=lambda a: a.data.dtype.name,
        device=lambda a: "cpu",
        shape=lambda a: a.data.shape,
        full=lambda shape, value, dtype, like: fakefw.Array(_NUMPY.full(shape, value, dtype, like.data)),
    )


@normkit.hookimpl
def normkit_batch_norm(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    y, m, v = numpy_backend.normkit_batch_norm(
        x.data, _unwrap(weight), _unwrap(bias), _unwrap(running_mean), _unwrap(running_var),
        training, momentum, eps, axis, unbiased_running_var,
    )  # fmt: skip
    return fakefw.Array(y), _wrap(m), _wrap(v)


@normkit.hookimpl
def normkit_instance_norm(
    x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var
):
    y, m, v = numpy_backend.normkit_instance_norm(
        x.data, _unwrap(weight), _unwrap(bias), _unwrap(running_mean), _unwrap(running_var),
        use_input_stats, momentum, eps, axis, unbiased_running_var,
    )  # fmt: skip
    return fakefw.Array(y), _wrap(m), _wrap(v)


@normkit.hookimpl
def normkit_layer_norm(x, weight, bias, axes, eps):
    return fakefw.Array(numpy_backend.normkit_layer_norm(x.data, _unwrap(weight), _unwrap(bias), axes, eps))
