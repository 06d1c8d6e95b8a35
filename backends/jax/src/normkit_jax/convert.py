r"""PyTorch normalization layers into :mod:`normkit_jax.nnx` and :mod:`normkit_jax.linen` layers
with the same eval outputs.

What carries over, for ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``), ``LayerNorm``,
``GroupNorm``, ``RMSNorm`` and ``InstanceNorm1d/2d/3d``:

* **Names.** ``weight`` → ``scale``, ``bias`` → ``bias`` (``params``), ``running_mean`` →
  ``mean``, ``running_var`` → ``var`` (``batch_stats``); ``num_batches_tracked`` is dropped (Flax
  keeps no counter).
* **Momentum.** PyTorch's ``momentum`` :math:`m` weighs the new batch,
  :math:`r \leftarrow (1-m)\,r + m\,b`; Flax's decay :math:`d` weighs the old value,
  :math:`r \leftarrow d\,r + (1-d)\,b`; so :math:`d = 1 - m` (0.1 → 0.9). PyTorch's cumulative
  average (``momentum=None``) has no Flax form: pass ``momentum=`` (a decay) to convert it.
* **Running variance.** PyTorch stores the *unbiased* batch variance
  :math:`\frac{n}{n-1}\sigma^2` in ``running_var``, Flax the biased one. Either is an estimate of
  the population variance and eval uses it as it is, so it is copied unchanged (as
  :func:`normkit.convert_state_dict` does between presets; no :math:`n/(n-1)` could be undone,
  :math:`n` is not stored): eval outputs are identical. Training continued in Flax mixes in
  biased batch variances, smaller by the factor :math:`(n-1)/n` (0.4% at 256 values per
  channel).
* **eps** is carried over (PyTorch's default 1e-5 is not Flax's 1e-6 for layer, group and
  instance norm). ``RMSNorm(eps=None)`` means the input dtype's machine epsilon in PyTorch: this
  converts it to float32's, :math:`2^{-23}`.
* **Layout.** PyTorch is channels-first (NCHW), Flax channels-last (NHWC). With
  ``channels_last=True`` (the default) batch and instance norm get ``axis=-1``, and the input
  must be transposed, ``x.transpose(0, 2, 3, 1)`` for 2-D images; ``channels_last=False`` keeps
  ``axis=1`` and NCHW input. GroupNorm is channels-last only in Flax. Layer and RMS norm
  normalize the trailing axes in PyTorch's order: give them the same trailing layout.
* **Modes.** The layers come back in eval mode (``use_running_average=True`` where there are
  running statistics); call ``.train()`` (nnx) or pass ``use_running_average=False`` to train.

Arrays may be ``torch.Tensor`` (any device; bfloat16 too) or NumPy arrays; this module never
imports torch.

>>> import numpy as np
>>> from normkit_jax import convert
>>> convert.flax_momentum(0.1)
0.9
>>> variables = convert.linen_variables(
...     {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)}
... )
>>> sorted(variables), sorted(variables["params"]), sorted(variables["batch_stats"])
(['batch_stats', 'params'], ['bias', 'scale'], ['mean', 'var'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from normkit import StateDictError

__all__ = ["TORCH_NAMES", "flax_momentum", "from_torch", "linen_variables", "load_into_nnx", "to_numpy"]

TORCH_NAMES: dict[str, tuple[str, str]] = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
"""PyTorch's state-dict key → Flax's ``(collection, name)``."""
IGNORED = ("num_batches_tracked",)
"""PyTorch keys with no Flax counterpart (dropped)."""

_BATCH = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
_INSTANCE = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


def flax_momentum(torch_momentum: float | None) -> float:
    r"""Flax's decay :math:`d = 1 - m` for PyTorch's momentum :math:`m` (0.1 → 0.9).

    :raises ValueError: for ``None`` (PyTorch's cumulative average, which Flax cannot express)
        or a value outside ``[0, 1]``.
    """
    if torch_momentum is None:
        raise ValueError(
            "momentum=None is PyTorch's cumulative average, which Flax's layers cannot express; "
            "pass momentum= (a Flax decay, e.g. 0.9) to convert this layer"
        )
    if isinstance(torch_momentum, bool) or not 0.0 <= float(torch_momentum) <= 1.0:
        raise ValueError(f"momentum={torch_momentum!r}: expected PyTorch's momentum, a number in [0, 1]")
    return 1.0 - float(torch_momentum)


def to_numpy(value: Any, key: str = "value") -> np.ndarray:
    """A NumPy copy of a ``torch.Tensor`` (detached, moved to the CPU; bfloat16 widened to
    float32) or of anything :func:`numpy.asarray` takes; it must be floating.

    :raises StateDictError: naming ``key`` for a non-floating array.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            tensor = tensor.float()
        array = tensor.numpy().copy()
    else:
        array = np.array(value, copy=True)
    if array.dtype.kind != "f":
        raise StateDictError(f"{key} has dtype {array.dtype}; expected a floating array")
    return array


def _entries(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """The layer's arrays by PyTorch name (``prefix`` stripped), checked for unknown keys."""
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"state_dict is a {type(state_dict).__name__}; expected a mapping of names to arrays"
        )
    names = {key[len(prefix) :]: key for key in state_dict if key.startswith(prefix)}
    if prefix and not names:
        raise StateDictError(f"state_dict has no key starting with prefix={prefix!r}")
    unknown = sorted(k for k in names if k not in TORCH_NAMES and k not in IGNORED)
    if unknown:
        raise StateDictError(
            f"state_dict has keys {[prefix + k for k in unknown]} that no Flax variable takes; expected "
            f"{sorted(TORCH_NAMES)} (and {list(IGNORED)}, dropped) after prefix={prefix!r}"
        )
    return {k: to_numpy(state_dict[full], full) for k, full in names.items() if k in TORCH_NAMES}


def linen_variables(
    state_dict: Mapping[str, Any], *, prefix: str = "", dtype: Any = jnp.float32
) -> dict[str, dict[str, Any]]:
    """A PyTorch layer's ``state_dict`` as a ``flax.linen`` variables dict,
    ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` (only what the state holds),
    arrays in PyTorch's shapes (which are linen's: ``(C,)``, or layer norm's normalized shape).

    :param prefix: the layer's prefix in a whole model's state dict (``"bn1."``).
    :param dtype: the dtype of every array (linen's default ``param_dtype`` and statistics
        dtype, float32).
    :raises StateDictError: for keys no Flax variable takes, or non-floating arrays.
    """
    variables: dict[str, dict[str, Any]] = {}
    for name, array in _entries(state_dict, prefix).items():
        collection, flax_name = TORCH_NAMES[name]
        variables.setdefault(collection, {})[flax_name] = jnp.asarray(array, dtype)
    return variables


def load_into_nnx(layer: Any, state_dict: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Assign a PyTorch layer's ``state_dict`` to an :mod:`normkit_jax.nnx` (or ``flax.nnx``)
    layer, cast to each variable's dtype and reshaped to its shape (layer norm's ``(C, H, W)``
    weight becomes the ``(C*H*W,)`` scale).

    Every key the layer has must be present and every present key must fit (same number of
    elements), or nothing is assigned.

    :returns: ``layer``.
    :raises StateDictError: naming the key that is missing, unexpected or misshapen.
    """
    arrays = _entries(state_dict, prefix)
    targets = {}
    for name, (_, flax_name) in TORCH_NAMES.items():
        variable = getattr(layer, flax_name, None)
        if variable is not None and hasattr(variable, "get_value"):
            targets[name] = variable
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    if missing or unexpected:
        raise StateDictError(
            f"state_dict does not fit {type(layer).__name__}: missing {[prefix + k for k in missing]}, "
            f"unexpected {[prefix + k for k in unexpected]}"
        )
    values = {}
    for name, variable in targets.items():
        shape = tuple(variable.shape)
        if arrays[name].size != math.prod(shape):
            raise StateDictError(
                f"{prefix}{name} has shape {arrays[name].shape}; {type(layer).__name__}.{TORCH_NAMES[name][1]} "
                f"has shape {shape}"
            )
        values[name] = jnp.asarray(arrays[name].reshape(shape), variable.dtype)
    for name, value in values.items():  # only once everything fits
        targets[name][...] = value
    return layer


def _module_config(module: Any) -> tuple[str, dict[str, Any]]:
    kind = type(module).__name__
    names = (
        "num_features", "eps", "momentum", "affine", "track_running_stats", "normalized_shape",
        "elementwise_affine", "num_groups", "num_channels",
    )  # fmt: skip
    config = {name: getattr(module, name) for name in names if hasattr(module, name)}
    config["has_bias"] = getattr(module, "bias", None) is not None  # LayerNorm(bias=False) has none
    return kind, config


def from_torch(
    module: Any,
    *,
    api: str = "nnx",
    channels_last: bool = True,
    momentum: float | None = None,
    rngs: Any = None,
) -> Any:
    """The :mod:`normkit_jax` layer equivalent to a PyTorch normalization layer, with its state,
    in eval mode (see the module docstring for what carries over).

    :param module: a ``torch.nn`` ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LayerNorm``,
        ``GroupNorm``, ``RMSNorm`` or ``InstanceNorm1d/2d/3d`` (read through its attributes and
        ``state_dict()``).
    :param api: ``"nnx"`` (returns the layer) or ``"linen"`` (returns ``(module, variables)``).
    :param channels_last: batch and instance norm on NHWC input (``axis=-1``); ``False``: NCHW
        (``axis=1``).
    :param momentum: a Flax decay to use instead of ``1 - module.momentum`` (required when that
        is ``None``, the cumulative average).
    :param rngs: ``flax.nnx.Rngs`` for the nnx layer's constructor (default ``nnx.Rngs(0)``;
        every value is then overwritten by the state).
    :raises ValueError: for a layer Flax cannot express (batch norm without running statistics,
        channels-first group norm, an unknown class).
    """
    if api not in ("nnx", "linen"):
        raise ValueError(f"api={api!r}: expected 'nnx' or 'linen'")
    kind, config = _module_config(module)
    kwargs, layer_name, tracked = _flax_config(kind, config, channels_last=channels_last, momentum=momentum)
    state = module.state_dict()
    if api == "linen":
        from normkit_jax import linen

        if tracked:
            kwargs["use_running_average"] = True
        kwargs.pop("num_features", None)
        return getattr(linen, layer_name)(**kwargs), linen_variables(state)
    from flax import nnx as flax_nnx

    from normkit_jax import nnx

    if tracked:
        kwargs["use_running_average"] = True
    if layer_name == "GroupNorm":
        kwargs["num_features"] = config["num_channels"]
    layer = getattr(nnx, layer_name)(rngs=rngs if rngs is not None else flax_nnx.Rngs(0), **kwargs)
    return load_into_nnx(layer, state)


def _flax_config(
    kind: str, config: Mapping[str, Any], *, channels_last: bool, momentum: float | None
) -> tuple[dict[str, Any], str, bool]:
    """``(constructor kwargs, layer class name, tracks running statistics)`` for a torch layer."""
    eps = config.get("eps")
    if kind in _BATCH:
        if not config["track_running_stats"]:
            raise ValueError(
                f"{kind}(track_running_stats=False) normalizes with batch statistics in eval; Flax's "
                f"BatchNorm always tracks them. Use BatchNorm(use_running_average=False) for that behaviour"
            )
        decay = momentum if momentum is not None else flax_momentum(config["momentum"])
        affine = bool(config["affine"])
        kwargs = dict(
            num_features=config["num_features"], axis=-1 if channels_last else 1, momentum=decay,
            epsilon=eps, use_scale=affine, use_bias=affine,
        )  # fmt: skip
        return kwargs, "BatchNorm", True
    if kind in _INSTANCE:
        tracked = bool(config["track_running_stats"])
        affine = bool(config["affine"])
        kwargs = dict(
            num_features=config["num_features"], feature_axes=-1 if channels_last else 1, epsilon=eps,
            use_scale=affine, use_bias=affine, track_running_stats=tracked,
        )  # fmt: skip
        if tracked:
            kwargs["momentum"] = momentum if momentum is not None else flax_momentum(config["momentum"])
        return kwargs, "InstanceNorm", tracked
    if kind == "GroupNorm":
        if not channels_last:
            raise ValueError(
                "GroupNorm: Flax's GroupNorm takes channels last only; convert with channels_last=True"
            )
        affine = bool(config["affine"])
        return (
            dict(num_groups=config["num_groups"], epsilon=eps, use_scale=affine, use_bias=affine),
            "GroupNorm",
            False,
        )
    if kind in ("LayerNorm", "RMSNorm"):
        shape = tuple(config["normalized_shape"])
        axes = tuple(range(-len(shape), 0))
        affine = bool(config["elementwise_affine"])
        if kind == "RMSNorm":
            epsilon = float(np.finfo(np.float32).eps) if eps is None else eps
            return (
                dict(num_features=math.prod(shape), epsilon=epsilon, use_scale=affine, reduction_axes=axes,
                     feature_axes=axes),
                "RMSNorm",
                False,
            )  # fmt: skip
        return (
            dict(num_features=math.prod(shape), epsilon=eps, use_scale=affine,
                 use_bias=affine and config["has_bias"], reduction_axes=axes, feature_axes=axes),
            "LayerNorm",
            False,
        )  # fmt: skip
    raise ValueError(
        f"{kind}: not a PyTorch normalization layer this converts (BatchNorm1d/2d/3d, SyncBatchNorm, "
        f"LayerNorm, GroupNorm, RMSNorm, InstanceNorm1d/2d/3d)"
    )
