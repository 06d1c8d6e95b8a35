"""What ``normkit bench`` measures each backend against: the frameworks' own ops (the
*natives*), the bandwidth floor in each framework, and how a framework runs a function at its
best (TensorFlow: inside ``tf.function``; JAX: under ``jax.jit``, waiting for the result).
Frameworks are imported only when a backend that needs them is benchmarked.

=============  ============================================  ==========================================
backend        natives (same data, same layout)              floor
=============  ============================================  ==========================================
numpy          ``torch``: PyTorch's ``F.*_norm`` on the CPU  ``np.copyto`` into a preallocated array
torch          ``torch``: the ATen call, on the same tensor  ``Tensor.copy_`` into a preallocated tensor
tensorflow     ``keras``: ``keras.layers.*Normalization``;   ``tf.raw_ops.DeepCopy`` (allocates, as
               ``tf.nn``: ``tf.nn.moments`` and              every TF op does)
               ``tf.nn.batch_normalization`` (group norm:
               on a ``(.., G, C/G, ..)`` view; RMS norm:
               ``x * rsqrt(mean(x²) + eps) * w``); all in
               ``tf.function``
cupy           ``torch``: PyTorch's CUDA op on the same      ``cupy.copyto`` into a preallocated
               memory (DLPack), when PyTorch has CUDA        array; every call synchronized
jax            ``flax``, ``flax-fast``: ``flax.linen``'s     a jitted ``jnp.copy`` (XLA allocates
               layers with ``use_fast_variance=False`` and   every output); every call waits for
               ``True``, applied under ``jax.jit``           its result
=============  ============================================  ==========================================

Channels-last data is given to PyTorch as a ``channels_last`` tensor (a logical ``(N, C, H, W)``
view of the same memory), so each native reads the bytes normkit reads. For group norm that
layout selects ATen's one-pass CPU kernel (``E[x²] - E[x]²``, inaccurate far from zero; normkit's
torch backend does not use it there): the bench measures speed, not accuracy.

Module workloads compare layers as a model calls them, eagerly: ``normkit_torch``'s drop-in
modules against their ``torch.nn`` namesakes (native ``torch.nn``; training with autograd on,
eval under ``torch.no_grad()``), and ``normkit_tensorflow``'s Keras layers against Keras's own
(native ``keras``; instance norm against ``GroupNormalization(groups=-1)``), every layer with
its defaults. A module workload runs on a backend only where both layers exist
(:func:`has_modules`).

For a GPU backend the results also carry the device, its peak memory bandwidth and the
effective bandwidth of the normkit op (``2 * x.nbytes / time``: reading ``x`` and writing ``y``
once, the least a normalization moves) as a fraction of the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from normkit.bench import Workload

__all__ = [
    "EPS",
    "build_modules",
    "build_natives",
    "compiled",
    "floor",
    "framework_of",
    "has_modules",
    "natives_for",
    "settings",
]

Builder = Callable[["Workload", str, Any], Callable[[], Any]]

EPS = 1e-5
"""The ε every functional op and native is given (the ``torch`` preset's for batch, layer,
instance and group norm; RMS norm gets it explicitly too, for every implementation alike)."""


def framework_of(name: str) -> str:
    """The framework a backend or a native belongs to (``keras`` and ``tf.nn`` are TensorFlow's)."""
    return {"keras": "tensorflow", "tf.nn": "tensorflow", "flax": "jax", "flax-fast": "jax"}.get(name, name)


def build_natives(
    backend: str, workload: Workload, mode: str, x: Any, x_np: np.ndarray
) -> dict[str, Callable[[], Any]]:
    """The runnable natives for a backend: on its own array when the native shares its framework
    (or, for CuPy, its GPU memory), else on the NumPy copy; natives that cannot run here are left out."""
    calls = {}
    for name, build in natives_for(backend).items():
        shared = framework_of(name) == framework_of(backend) or backend == "cupy"
        try:
            calls[name] = build(workload, mode, x if shared else x_np)
        except _Unavailable:
            continue
    return calls


def _torch(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """PyTorch's own op (channels-last as a memory format), on the torch backend's very tensor
    or on a NumPy input's memory."""
    import torch
    import torch.nn.functional as F

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
    if workload.op not in ("layer_norm", "rms_norm") and workload.axis % t.dim() != 1:
        t = t.movedim(workload.axis, 1)  # logical NCHW view of channels-last memory
    size = workload.param_size
    options = {"device": t.device, "dtype": t.dtype}
    weight, bias = torch.ones(size, **options), torch.zeros(size, **options)
    if workload.op == "layer_norm":
        return lambda: F.layer_norm(t, (size,), weight, bias, EPS)
    if workload.op == "rms_norm":
        return lambda: F.rms_norm(t, (size,), weight, EPS)
    if workload.op == "group_norm":
        return lambda: F.group_norm(t, workload.num_groups, weight, bias, EPS)
    mean, var = torch.zeros(size, **options), torch.ones(size, **options)
    training = mode == "train"
    if workload.op == "batch_norm":
        return lambda: F.batch_norm(t, mean, var, weight, bias, training, 0.1, EPS)
    return lambda: F.instance_norm(t, mean, var, weight, bias, training, 0.1, EPS)


def _keras(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """Keras's own layer, called in ``tf.function`` (instance norm: ``GroupNormalization`` with
    one group per channel)."""
    import keras
    import tensorflow as tf

    axis = workload.axis % len(workload.shape)
    dtype = workload.dtype  # float64 layers for float64 data (a float32 layer would cast it)
    if workload.op == "layer_norm":
        layer = keras.layers.LayerNormalization(axis=-1, epsilon=EPS, dtype=dtype)
    elif workload.op == "rms_norm":
        if not hasattr(keras.layers, "RMSNormalization"):
            raise _Unavailable("keras.layers.RMSNormalization needs Keras 3.9 or later")
        layer = keras.layers.RMSNormalization(axis=-1, epsilon=EPS, dtype=dtype)
    elif workload.op == "batch_norm":
        layer = keras.layers.BatchNormalization(axis=axis, epsilon=EPS, dtype=dtype)
    else:
        groups = workload.num_groups if workload.op == "group_norm" else -1
        layer = keras.layers.GroupNormalization(groups=groups, axis=axis, epsilon=EPS, dtype=dtype)
    training = mode == "train"
    call = tf.function(lambda t: layer(t, training=training))
    return lambda: call(x)


def _tf_nn(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """``tf.nn.moments`` and ``tf.nn.batch_normalization`` in ``tf.function`` (RMS norm, which
    has no ``tf.nn`` op: the formula in TensorFlow's ops)."""
    import tensorflow as tf

    rank = len(workload.shape)
    axis = workload.axis % rank
    if workload.op == "group_norm":
        return _tf_nn_group_norm(workload, x)
    if workload.op == "rms_norm":
        weight = tf.ones([workload.param_size], x.dtype)

        @tf.function
        def rms(t: Any) -> Any:
            return t * tf.math.rsqrt(tf.reduce_mean(tf.square(t), axis=-1, keepdims=True) + EPS) * weight

        return lambda: rms(x)
    if workload.op == "layer_norm":
        axes = [rank - 1]
    elif workload.op == "batch_norm":
        axes = [a for a in range(rank) if a != axis]
    else:
        axes = [a for a in range(1, rank) if a != axis]
    size = workload.shape[-1] if workload.op == "layer_norm" else workload.channels
    shape = [1] * rank
    shape[-1 if workload.op == "layer_norm" else axis] = size
    dtype = x.dtype
    gamma, beta = tf.ones(shape, dtype), tf.zeros(shape, dtype)
    moving_mean, moving_var = tf.zeros(shape, dtype), tf.ones(shape, dtype)
    use_batch = mode == "train" or workload.op == "layer_norm"

    @tf.function
    def call(t: Any) -> Any:
        if use_batch:
            mean, var = tf.nn.moments(t, axes=axes, keepdims=True)
        else:
            mean, var = moving_mean, moving_var
        return tf.nn.batch_normalization(t, mean, var, beta, gamma, EPS)

    return lambda: call(x)


def _tf_nn_group_norm(workload: Workload, x: Any) -> Callable[[], Any]:
    """Group norm with ``tf.nn.moments`` and ``tf.nn.batch_normalization`` on a view that splits
    the channels into ``(G, C/G)``, as Keras's ``GroupNormalization`` computes it."""
    import tensorflow as tf

    shape = list(workload.shape)
    axis = workload.axis % len(shape)
    groups = int(workload.num_groups or 1)
    grouped = [*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :]]
    axes = [a for a in range(1, len(grouped)) if a != axis]  # all but the batch and the group
    per_channel = [1] * len(grouped)
    per_channel[axis], per_channel[axis + 1] = groups, shape[axis] // groups
    gamma, beta = tf.ones(per_channel, x.dtype), tf.zeros(per_channel, x.dtype)

    @tf.function
    def call(t: Any) -> Any:
        g = tf.reshape(t, grouped)
        mean, var = tf.nn.moments(g, axes=axes, keepdims=True)
        return tf.reshape(tf.nn.batch_normalization(g, mean, var, beta, gamma, EPS), shape)

    return lambda: call(x)


def _flax(workload: Workload, mode: str, x: Any, fast: bool) -> Callable[[], Any]:
    """Flax's own ``flax.linen`` layer, ``apply``-ed under ``jax.jit`` (training: with
    ``mutable=["batch_stats"]``, so the updated statistics are computed as in a train step), with
    ``use_fast_variance=fast``: Flax's default ``True`` is :math:`E[x^2] - E[x]^2` (inaccurate far
    from zero; the bench measures speed, not accuracy), ``False`` the two-pass variance normkit
    computes. Flax's group norm needs the channels last, and its instance norm keeps no running
    statistics (no eval row); RMS norm has no fast variant (it computes no variance)."""
    import flax.linen as nn
    import jax

    axis = workload.axis % len(workload.shape)
    common = {"epsilon": EPS, "use_fast_variance": fast, "dtype": workload.dtype, "param_dtype": "float32"}
    training = mode == "train"
    if workload.op == "layer_norm":
        module = nn.LayerNorm(**common)
    elif workload.op == "rms_norm":
        if fast:
            raise _Unavailable("flax.linen.RMSNorm computes no variance: no fast variant")
        module = nn.RMSNorm(**common)
    elif workload.op == "group_norm":
        if axis != len(workload.shape) - 1:
            raise _Unavailable("flax.linen.GroupNorm needs the channels last")
        module = nn.GroupNorm(num_groups=workload.num_groups, **common)
    elif workload.op == "instance_norm":
        if not training:
            raise _Unavailable("flax.linen.InstanceNorm keeps no running statistics")
        module = nn.InstanceNorm(feature_axes=axis, **common)
    else:
        module = nn.BatchNorm(use_running_average=not training, axis=axis, momentum=0.9, **common)
    variables = module.init(jax.random.key(0), x)
    if workload.op == "batch_norm" and training:
        call = jax.jit(lambda v, t: module.apply(v, t, mutable=["batch_stats"]))
    else:
        call = jax.jit(module.apply)
    return lambda: jax.block_until_ready(call(variables, x))


def _flax_two_pass(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """Flax's layer with ``use_fast_variance=False`` (see :func:`_flax`)."""
    return _flax(workload, mode, x, fast=False)


def _flax_fast(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """Flax's layer with its default ``use_fast_variance=True`` (see :func:`_flax`)."""
    return _flax(workload, mode, x, fast=True)


def _torch_cuda(workload: Workload, mode: str, x: Any) -> Callable[[], Any]:
    """PyTorch's op on the same GPU memory (shared through DLPack), synchronized like normkit's."""
    import torch

    if not torch.cuda.is_available():
        raise _Unavailable("PyTorch has no CUDA device")
    call = _torch(workload, mode, torch.from_dlpack(x))
    return lambda: (call(), torch.cuda.synchronize())


def _torch_modules(
    workload: Workload, mode: str, x: Any
) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """``normkit_torch``'s module and ``torch.nn``'s namesake, with their defaults, on one tensor."""
    import torch
    from torch import nn

    import normkit_torch

    name = _torch_module_name(workload)
    if workload.op == "group_norm":
        arguments: tuple[int, ...] = (int(workload.num_groups or 1), workload.channels)
    else:
        arguments = (workload.param_size,)
    if workload.preset is None:
        mine, native = getattr(normkit_torch, name)(*arguments), getattr(nn, name)(*arguments)
    else:  # torch.nn's layer with the same eps, momentum and affine as the preset's
        mine = getattr(normkit_torch, name)(*arguments, preset=workload.preset)
        same = {key: getattr(mine, key) for key in ("eps", "momentum", "affine") if hasattr(mine, key)}
        native = getattr(nn, name)(*arguments, **same)
    if mode == "train":
        return (lambda: mine(x)), {"torch.nn": lambda: native(x)}
    mine.eval()
    native.eval()

    def inference(module: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return module(x)

        return call

    return inference(mine), {"torch.nn": inference(native)}


def _torch_module_name(workload: Workload) -> str:
    """The ``torch.nn`` class (and its ``normkit_torch`` drop-in) a module workload times."""
    fixed = {"layer_norm": "LayerNorm", "group_norm": "GroupNorm", "rms_norm": "RMSNorm"}
    if workload.op in fixed:
        return fixed[workload.op]
    family = "BatchNorm" if workload.op == "batch_norm" else "InstanceNorm"
    return f"{family}{max(len(workload.shape) - 2, 1)}d"


def _keras_modules(
    workload: Workload, mode: str, x: Any
) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """normkit's Keras layer and Keras's own, with their defaults, called eagerly."""
    import keras

    import normkit_tensorflow

    if workload.op == "layer_norm":
        mine, native = normkit_tensorflow.LayerNormalization(), keras.layers.LayerNormalization()
    elif workload.op == "rms_norm":
        mine, native = normkit_tensorflow.RMSNormalization(), keras.layers.RMSNormalization()
    elif workload.op == "group_norm":
        groups = int(workload.num_groups or 1)
        mine = normkit_tensorflow.GroupNormalization(groups=groups, axis=workload.axis)
        native = keras.layers.GroupNormalization(groups=groups, axis=workload.axis)
    elif workload.op == "batch_norm":
        mine = normkit_tensorflow.BatchNormalization(axis=workload.axis)
        native = keras.layers.BatchNormalization(axis=workload.axis)
    else:
        mine = normkit_tensorflow.InstanceNormalization(axis=workload.axis)
        native = keras.layers.GroupNormalization(groups=-1, axis=workload.axis)
    training = mode == "train"
    return (lambda: mine(x, training=training)), {"keras": lambda: native(x, training=training)}


_MODULES = {"torch": _torch_modules, "tensorflow": _keras_modules}

_KERAS_LAYERS = {
    "batch_norm": ("BatchNormalization", "BatchNormalization"),
    "instance_norm": ("InstanceNormalization", "GroupNormalization"),
    "layer_norm": ("LayerNormalization", "LayerNormalization"),
    "group_norm": ("GroupNormalization", "GroupNormalization"),
    "rms_norm": ("RMSNormalization", "RMSNormalization"),
}
"""Per op: normkit's Keras layer and Keras's own that a module workload times."""


def has_modules(backend: str, workload: Workload | None = None) -> bool:
    """Whether the backend ships framework layers that module workloads can time (for
    ``workload``: whether both normkit's layer and the framework's own exist here, e.g. not
    ``torch.nn.RMSNorm`` before PyTorch 2.4)."""
    if backend not in _MODULES:
        return False
    if workload is None:
        return True
    if workload.preset is not None and backend != "torch":
        return False  # the preset rows are the drop-in torch layers' only
    try:
        if backend == "torch":
            from torch import nn

            import normkit_torch

            name = _torch_module_name(workload)
            return hasattr(normkit_torch, name) and hasattr(nn, name)
        import keras

        import normkit_tensorflow

        mine, native = _KERAS_LAYERS[workload.op]
        return hasattr(normkit_tensorflow, mine) and hasattr(keras.layers, native)
    except ImportError:
        return False


def build_modules(
    backend: str, workload: Workload, mode: str, x: Any
) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """normkit's layer for a module workload and the framework's own, each a call on ``x``."""
    return _MODULES[backend](workload, mode, x)


class _Unavailable(Exception):
    """A native that cannot run on this machine (it is left out of the run)."""


_NATIVES: dict[str, dict[str, Builder]] = {
    "numpy": {"torch": _torch},
    "torch": {"torch": _torch},
    "tensorflow": {"keras": _keras, "tf.nn": _tf_nn},
    "cupy": {"torch": _torch_cuda},
    "jax": {"flax": _flax_two_pass, "flax-fast": _flax_fast},
}


_LIBRARY = {"flax": "flax", "flax-fast": "flax"}
"""Natives that need a library beyond their framework (Flax's layers, on JAX)."""


def natives_for(backend: str) -> dict[str, Builder]:
    """The natives a backend is compared with, among those whose framework (and library) is
    installed."""
    import importlib.util

    return {
        name: build
        for name, build in _NATIVES.get(backend, {}).items()
        if importlib.util.find_spec(framework_of(name)) is not None
        and importlib.util.find_spec(_LIBRARY.get(name, framework_of(name))) is not None
    }


def compiled(
    framework: str, make: Callable[[dict[str, Any]], Callable[[Any], Any]], params: dict[str, Any]
) -> Callable[[Any], Any]:
    """The op ``make(params)`` as the framework runs it at its best, as a function of the input:
    TensorFlow traces it into a graph (normkit's validation runs once, while tracing); JAX traces
    and compiles it with ``jax.jit``, with ``params`` (weights, running statistics) as arguments,
    as Flax's variables are, not as constants XLA could fold, and waits for the result; CuPy
    waits for its kernels; the others call it as it is."""
    if framework == "tensorflow":
        import tensorflow as tf

        return tf.function(make(params))
    if framework == "jax":
        import jax

        jitted = jax.jit(lambda x, p: make(p)(x))
        return lambda x: jax.block_until_ready(jitted(x, params))
    function = make(params)
    if framework == "cupy":  # kernels launch asynchronously: time them to completion
        import cupy

        def synchronized(x: Any) -> Any:
            result = function(x)
            cupy.cuda.get_current_stream().synchronize()
            return result

        return synchronized
    return function


def floor(framework: str, x: Any) -> Callable[[], Any]:
    """A copy of ``x`` in the backend's framework: reading and writing it once is what any
    normalization must at least do."""
    if isinstance(x, np.ndarray):
        out = np.empty_like(x)
        return lambda: np.copyto(out, x)
    if framework == "tensorflow":
        import tensorflow as tf

        copy = tf.function(lambda t: tf.raw_ops.DeepCopy(x=t))
        return lambda: copy(x)
    if framework == "jax":  # XLA allocates every output: a jitted copy into a new buffer
        import jax
        import jax.numpy as jnp

        copy = jax.jit(lambda t: jnp.copy(t))
        return lambda: jax.block_until_ready(copy(x))
    if framework == "cupy":
        import cupy

        out = cupy.empty_like(x)
        return lambda: (cupy.copyto(out, x), cupy.cuda.get_current_stream().synchronize())
    if hasattr(x, "clone"):
        out = x.clone()
        return lambda: out.copy_(x)
    raise NotImplementedError(f"no bandwidth floor for {type(x)}")


def peak_bandwidth_gbps(properties: dict[str, Any]) -> float:
    """A GPU's peak memory bandwidth in GB/s from its CUDA device properties: two transfers per
    memory clock (DDR) over the bus, ``2 * memoryClockRate [kHz] * memoryBusWidth [bit] / 8``."""
    return 2.0 * properties["memoryClockRate"] * 1e3 * properties["memoryBusWidth"] / 8 / 1e9


def device_bandwidth(framework: str, x: Any, seconds: float) -> dict[str, Any]:
    """For a GPU backend: the device, its peak bandwidth and the call's effective bandwidth,
    counting the least any normalization must move (read ``x`` once, write ``y`` once). The
    memory clock and bus width are read as device attributes (CUDA 13 dropped the clock from
    the properties struct); a device that reports no clock gets no peak."""
    if framework != "cupy":
        return {}
    import cupy

    runtime = cupy.cuda.runtime
    device = x.device.id
    clock = runtime.deviceGetAttribute(runtime.cudaDevAttrMemoryClockRate, device)
    bus = runtime.deviceGetAttribute(runtime.cudaDevAttrGlobalMemoryBusWidth, device)
    name = runtime.getDeviceProperties(device)["name"]
    effective = 2 * x.nbytes / seconds / 1e9
    peak = peak_bandwidth_gbps({"memoryClockRate": clock, "memoryBusWidth": bus})
    result: dict[str, Any] = {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "effective_GBps": effective,
    }
    if peak > 0:
        result.update(peak_GBps=peak, fraction_of_peak=effective / peak)
    return result


def settings(framework: str) -> dict[str, Any]:
    """Threading settings that shape the figures, recorded with them."""
    if framework in ("torch", "numpy"):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return {}
        import torch

        return {"torch_threads": torch.get_num_threads()}
    if framework == "jax":
        import os

        import jax

        return {"jax_platform": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if framework == "tensorflow":
        import tensorflow as tf

        return {
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }
    return {}
