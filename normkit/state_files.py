"""State files: a layer's state dict saved in the `safetensors <https://huggingface.co/docs/safetensors>`_
format.

A state file written by :func:`save_state` is an ordinary safetensors file (no pickle, so loading
one runs no code; memory-mappable; readable by ``safetensors`` from NumPy, PyTorch, TensorFlow,
JAX and every other framework it supports). It holds:

* one tensor per array of the state dict, under the state dict's (PyTorch's) names:
  ``weight``, ``bias``, ``running_mean``, ``running_var``, each in its dtype (float32 or
  float64) and shape, as NumPy arrays whatever backend the layer ran on;
* ``num_batches_tracked``, when the layer tracks running statistics: a 0-d int64 tensor (as
  PyTorch stores it);
* in the header's metadata (a ``dict[str, str]``), the key ``"normkit"``: the state dict's
  ``_metadata`` (format version, layer class, configuration) as a JSON object.

:func:`load_state` returns the state dict again (NumPy arrays, ``num_batches_tracked`` an
``int``, ``_metadata`` a ``dict``), which :meth:`~normkit.BatchNorm.load_state_dict` and
:meth:`~normkit.BatchNorm.from_state_dict` accept exactly like the original. It also reads files
other tools wrote: ``safetensors.torch.save_file(torch.nn.BatchNorm2d(C).state_dict(), path)``
gives the same tensors without the ``"normkit"`` metadata, so the dict it returns has no
``_metadata``; load it with ``load_state_dict`` into a layer configured to match (``from_state_dict``
needs the configuration). Other metadata in the header (``{"format": "pt"}``) is ignored.

``safetensors`` (and ``json``) are imported by these two functions, not by ``import normkit``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from normkit._registry import backend_for, type_name
from normkit.errors import StateDictError
from normkit.state import ARRAY_KEYS, COUNTER_KEY, FORMAT_VERSION, METADATA_KEY, _counter

__all__ = ["FILE_METADATA_KEY", "load_state", "save_state"]

FILE_METADATA_KEY = "normkit"
"""Key of the safetensors header metadata that holds the state dict's ``_metadata`` as JSON."""

_TENSOR_KEYS = (*ARRAY_KEYS, COUNTER_KEY)
_FLOAT_DTYPES = ("float32", "float64")


def save_state(state_dict: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state_dict`` (from ``layer.state_dict()``) to ``path`` as a safetensors file.

    The file holds the arrays (converted to NumPy from any backend), ``num_batches_tracked`` as a
    0-d int64 tensor and ``_metadata`` as JSON in the header (see :mod:`normkit.state_files`).
    It is written to a temporary file in the same directory, then renamed over ``path``, so
    ``path`` holds either its old contents or the whole new file, never a part of it.

    :param state_dict: keys among ``weight``, ``bias``, ``running_mean``, ``running_var`` (arrays
        of one shape, float32 or float64), ``num_batches_tracked`` (an integer) and ``_metadata``
        (a dict of JSON values with a supported ``format_version``).
    :param path: the file to write; its directory must exist.
    :raises StateDictError: if ``state_dict`` is not such a dict; nothing is written.
    """
    path = os.fspath(path)
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"state_dict is a {type_name(type(state_dict))}; expected a dict from layer.state_dict()"
        )
    unexpected = sorted(repr(key) for key in state_dict if key not in (*_TENSOR_KEYS, METADATA_KEY))
    if unexpected:
        raise StateDictError(
            f"state_dict has unexpected keys [{', '.join(unexpected)}]; a state file holds "
            f"{list(_TENSOR_KEYS)} and {METADATA_KEY!r}"
        )
    tensors: dict[str, np.ndarray] = {}
    for key in ARRAY_KEYS:
        if key in state_dict:
            tensors[key] = _as_numpy(key, state_dict[key])
    problem = _array_problem(tensors)
    if problem:
        raise StateDictError(f"state_dict: {problem}")
    if COUNTER_KEY in state_dict:
        tensors[COUNTER_KEY] = np.asarray(_counter(state_dict[COUNTER_KEY]), dtype="<i8")
    header: dict[str, str] | None = None
    if METADATA_KEY in state_dict:
        import json

        metadata = state_dict[METADATA_KEY]
        problem = _metadata_problem(metadata, f"state_dict[{METADATA_KEY!r}]")
        if problem:
            raise StateDictError(problem)
        try:
            header = {FILE_METADATA_KEY: json.dumps(dict(metadata), allow_nan=False)}
        except (TypeError, ValueError) as error:
            raise StateDictError(
                f"state_dict[{METADATA_KEY!r}] cannot be written as JSON ({error}); expected "
                f"str, int, float, bool, None and lists of them, as layer.state_dict() returns"
            ) from error

    from safetensors.numpy import save

    _write_atomically(path, save(tensors, metadata=header))


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state file written by :func:`save_state` (or by safetensors from a norm layer's
    state dict) and return the state dict it holds.

    The whole file is checked before anything is returned: a layer loading the result is
    changed only if the file was a complete, well-formed state.

    :returns: ``{"weight": ..., "bias": ..., "running_mean": ..., "running_var": ...,
        "num_batches_tracked": int, "_metadata": dict}``, each key present only if the file
        holds it; the arrays are NumPy arrays that own their data, and ``_metadata`` is present
        only in files with ``"normkit"`` header metadata.
    :raises FileNotFoundError: if ``path`` does not exist (and other :class:`OSError` if it
        cannot be read).
    :raises StateDictError: naming ``path``, if the file is not a safetensors file (truncated,
        a corrupted header, another format), or holds tensors that are not a norm layer's
        state, or normkit metadata this version cannot read.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:  # OSErrors name the path
        magic = file.read(8)
        size = os.fstat(file.fileno()).st_size

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as file:
            header = file.metadata() or {}
            names = list(file.keys())
            unexpected = sorted(set(names) - set(_TENSOR_KEYS))
            if unexpected:
                raise _file_error(
                    path,
                    f"it holds tensors {unexpected}, which are not a norm layer's state; expected "
                    f"only {list(_TENSOR_KEYS)} (one layer's state dict)",
                )
            tensors: dict[str, np.ndarray] = {}
            for name in names:
                try:
                    tensors[name] = np.array(file.get_tensor(name), copy=True)
                except (TypeError, ValueError) as error:  # a dtype NumPy has no type for (bfloat16, ...)
                    raise _file_error(
                        path,
                        f"tensor {name!r} has a dtype NumPy cannot hold ({error}); expected float32 or float64",
                    ) from error
    except SafetensorError as error:
        raise _file_error(
            path,
            f"it is not a valid safetensors file (safetensors: {error}){_sniff(magic)}; expected a file "
            f"written by normkit.save_state or a safetensors save_file",
            size=size,
        ) from error

    result: dict[str, Any] = {key: tensors[key] for key in ARRAY_KEYS if key in tensors}
    problem = _array_problem(result)
    if problem:
        raise _file_error(path, problem)
    if COUNTER_KEY in tensors:
        counter = tensors[COUNTER_KEY]
        if counter.shape != () or counter.dtype.kind not in "iu" or int(counter) < 0:
            raise _file_error(
                path,
                f"{COUNTER_KEY} has shape {counter.shape}, dtype {counter.dtype} and value(s) "
                f"{counter.tolist()}; expected a non-negative integer scalar (0-d int64)",
            )
        result[COUNTER_KEY] = int(counter)
    if FILE_METADATA_KEY in header:
        import json

        where = f"its {FILE_METADATA_KEY!r} header metadata"
        try:
            metadata = json.loads(header[FILE_METADATA_KEY])
        except ValueError as error:  # json.JSONDecodeError
            raise _file_error(path, f"{where} is not valid JSON ({error}); expected a JSON object") from error
        problem = _metadata_problem(metadata, where)
        if problem:
            raise _file_error(path, problem)
        result[METADATA_KEY] = metadata
    return result


def _as_numpy(key: str, value: object) -> np.ndarray:
    """``value`` as a C-contiguous little-endian NumPy array (what safetensors stores)."""
    try:
        array = np.asarray(backend_for(value).info.to_numpy(value))
    except TypeError as error:
        raise StateDictError(
            f"state_dict[{key!r}] is a {type_name(type(value))}, not an array of a normkit backend "
            f"({error}); expected the arrays layer.state_dict() returns"
        ) from error
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _array_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    """What breaks the rules every state's arrays follow (float32 or float64, one dtype, one
    shape, not 0-d), or ``None``."""
    for key, array in arrays.items():
        if array.dtype.name not in _FLOAT_DTYPES:
            return f"{key} has dtype {array.dtype.name}; expected float32 or float64"
        if array.ndim == 0:
            return f"{key} is 0-d; expected an array of one value per feature"
    dtypes = {key: array.dtype.name for key, array in arrays.items()}
    if len(set(dtypes.values())) > 1:
        return f"the arrays mix dtypes {dtypes}; expected one"
    shapes = {key: array.shape for key, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        return f"the arrays have different shapes {shapes}; expected one shape"
    return None


def _metadata_problem(metadata: object, where: str) -> str | None:
    """What makes ``metadata`` unreadable for this normkit, or ``None``."""
    if not isinstance(metadata, Mapping):
        return f"{where} is a {type_name(type(metadata))}; expected a dict"
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"{where} has format_version={version!r}; expected an int >= 1"
    if version > FORMAT_VERSION:
        return (
            f"{where} has format_version={version}, written by a newer normkit; expected at most "
            f"{FORMAT_VERSION}, the version this normkit reads"
        )
    return None


def _file_error(path: str, problem: str, *, size: int | None = None) -> StateDictError:
    of_size = "" if size is None else f" ({size} bytes)"
    return StateDictError(f"state file {path!r}{of_size}: {problem}. Nothing was loaded")


def _sniff(magic: bytes) -> str:
    """A hint when the first bytes give away another format."""
    if magic.startswith(b"PK\x03\x04"):
        return "; it is a zip archive, as torch.save and numpy.savez write"
    if magic.startswith(b"\x80") or magic.startswith(b"\x93NUMPY"):
        return "; it is a pickle or .npy file"
    if magic.startswith(b"\x89HDF"):
        return "; it is an HDF5 file (a Keras .h5?)"
    return ""


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path``, flush it to disk, then rename it to ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    # 0o666 before the umask: the permissions open() would give a new file
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
